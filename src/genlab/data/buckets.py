"""Aspect-ratio buckets: fine-tuning on images of mixed shapes without cropping them square.

As kohya-ss/sd-scripts and SimpleTuner do: a set of (width, height) buckets of about the
same area (image_size squared), sides multiples of `step`; each image goes to the bucket
whose aspect ratio is nearest its own, is resized to cover it and centre-cropped; each
batch holds one bucket only. `BucketOrder` is the batch order: a pure function of
(seed, epoch), so resume stays exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from PIL import Image

from genlab.errors import ConfigError


def bucket_sizes(image_size: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets: sides multiples of `step`, area at most image_size**2 (the
    largest such height for each width), aspect ratio within [1 / max_ratio, max_ratio]."""
    if step <= 0 or image_size % step or max_ratio < 1:
        raise ConfigError(f"data.buckets: step={step} must divide data.image_size={image_size} and "
                          f"max_ratio={max_ratio} must be >= 1.")
    area, sizes = image_size * image_size, set()
    for width in range(step, int(image_size * math.sqrt(max_ratio)) + 1, step):
        height = area // width // step * step
        if height >= step and 1 / max_ratio <= width / height <= max_ratio:
            sizes.add((width, height))
            sizes.add((height, width))
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest width / height (on a log scale)."""
    ratio = math.log(width / height)
    return min(range(len(sizes)), key=lambda i: (abs(math.log(sizes[i][0] / sizes[i][1]) - ratio), i))


def assign_buckets(files: list[str] | list[Path], sizes: list[tuple[int, int]],
                   cache_dir: str | Path | None = None) -> tuple[list[tuple[int, int]], list[int]]:
    """(bucket size, bucket index) of each file, from its header (width, height).

    Headers are read once (no decoding) and cached by path, size and time.
    """
    dims = image_dims(files, cache_dir)
    bucket_of = [nearest_bucket(w, h, sizes) for w, h in dims]
    return [sizes[b] for b in bucket_of], bucket_of


def image_dims(files: list[str] | list[Path], cache_dir: str | Path | None = None) -> list[tuple[int, int]]:
    """(width, height) of each file, read from headers and cached in <cache>/image_dims/."""
    from genlab.data.file_list import cache_root

    key = hashlib.sha1("\n".join(map(str, files)).encode()).hexdigest()[:16]
    cache = Path(cache_dir or cache_root() / "file_lists").expanduser() / f"dims-{key}.json"
    try:
        saved = json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, ValueError):  # torn or damaged: read the headers again and rewrite it
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    dims, changed = [], False
    for path in files:
        stat = os.stat(path)
        entry = saved.get(str(path))
        valid = isinstance(entry, list) and len(entry) == 4 and all(isinstance(v, int) and v > 0 for v in entry[2:])
        if not valid or entry[:2] != [stat.st_size, stat.st_mtime_ns]:
            try:
                with Image.open(path) as image:  # the header only
                    entry = [stat.st_size, stat.st_mtime_ns, *image.size]
            except Exception:  # unreadable: square, and reported when training reaches it
                entry = [stat.st_size, stat.st_mtime_ns, 1, 1]
            saved[str(path)], changed = entry, True
        dims.append((entry[2], entry[3]))
    if changed:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(saved))
        os.replace(tmp, cache)
    return dims


class BucketOrder:
    """Which dataset indices make up batch `b` of epoch `e` on this process, one bucket per batch.

    Epoch e: each bucket's items are shuffled and cut into global batches (batch_size x
    world_size; a bucket's incomplete last batch is dropped), then the batches of all
    buckets are shuffled together; this process takes its slice of each. All from a
    generator seeded by (seed, epoch).
    """

    def __init__(self, bucket_of: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.n = len(bucket_of)
        labels = torch.as_tensor(bucket_of)
        self.members = [torch.nonzero(labels == b).flatten() for b in sorted(set(bucket_of))]
        self.batches_per_epoch = sum(len(m) // (batch_size * world_size) for m in self.members)
        if self.batches_per_epoch == 0:
            raise ValueError(f"no aspect-ratio bucket holds one global batch ({batch_size} x {world_size} processes; "
                             f"largest bucket: {max(len(m) for m in self.members)} images); lower trainer.batch_size")

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """This process's index batches of `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        step = self.batch_size * self.world_size
        batches = []
        for members in self.members:
            shuffled = members[torch.randperm(len(members), generator=generator)]
            batches += [shuffled[i:i + step] for i in range(0, len(shuffled) - step + 1, step)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        start = self.rank * self.batch_size
        return [batches[i][start:start + self.batch_size] for i in order]
