"""Any folder of images, searched recursively; starts at once, skips and reports bad files.

Nothing is decoded at start-up: the file list comes from `file_list` (cached, checked by
folder times). A file that fails to decode is found when training reaches it: it is
reported, replaced by the next file, and remembered so that later starts leave it out.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from genlab.data import split_indices
from genlab.data.buckets import assign_buckets, bucket_sizes
from genlab.data.file_list import list_images, record_bad
from genlab.data.images import IMAGE_SUFFIXES, load_image
from genlab.errors import GenlabError

log = logging.getLogger(__name__)
MODE_PROBES = 16  # files whose header is read at start-up to warn about mixed modes


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `path` (recursively), split into train/val by `split_indices`.

    Args:
        path: the folder.
        split: "train" or "val".
        image_size: output side (resized to cover, centre-cropped); with buckets, the side
            of the square whose area every bucket keeps.
        channels: 3 (RGB) or 1 (grey); every image is converted.
        val_fraction, split_seed: the train/val partition.
        random_flip: mirror at random in training.
        max_bad_fraction: refuse to start when more files than this are known to be bad.
        cache_dir: where the file list is cached (None: <genlab cache>/file_lists).
        buckets: aspect-ratio buckets for the train split (see data/buckets.py): None, or
            {step, max_ratio}; each batch then holds one bucket's shape.
    """

    def __init__(self, path: str, split: str = "train", image_size: int = 64, channels: int = 3,
                 val_fraction: float = 0.05, split_seed: int = 0, random_flip: bool = True,
                 max_bad_fraction: float = 0.01, cache_dir: str | None = None, buckets: dict | None = None):
        root = Path(path).expanduser()
        if not root.is_dir():
            raise GenlabError(f"data.path={path} is not a folder; point data.path at a folder of images.")
        files, bad = list_images(root, cache_dir)
        if not files and not bad:
            raise GenlabError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}; check data.path.")
        if bad:
            log.warning("leaving out %d image(s) under %s that failed to decode before (unchanged since): %s",
                        len(bad), root, ", ".join(f"{f} ({r})" for f, r in list(bad.items())[:5]))
        if len(bad) > max_bad_fraction * (len(files) + len(bad)):
            listing = "\n  ".join(f"{f}: {r}" for f, r in bad.items())
            raise GenlabError(f"{len(bad)} of {len(files) + len(bad)} images under {root} cannot be read "
                              f"(more than data.max_bad_fraction={max_bad_fraction}); fix or remove them:\n  {listing}")
        self.root, self.cache_dir = root, cache_dir
        self.files = [files[i] for i in split_indices(len(files), split, val_fraction, split_seed)]
        self.image_size, self.channels = image_size, channels
        self.random_flip = random_flip and split == "train"
        self.item_keys = ("image",)
        self.recorded: set[str] = set()  # bad files this process has recorded
        self.sizes = None  # (width, height) per item, with buckets
        if buckets and split == "train":
            self.sizes, self.bucket_of = assign_buckets(self.files, bucket_sizes(image_size, **buckets), cache_dir)
        elif self.files:
            _warn_mixed_modes(self.files[:: max(1, len(self.files) // MODE_PROBES)][:MODE_PROBES], channels, root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        size = self.image_size if self.sizes is None else self.sizes[i]
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        # A file can fail to decode (corrupt, truncated): report it, remember it, use the next one.
        for attempt in range(len(self.files)):
            path = self.files[(i + attempt) % len(self.files)]
            try:
                with Image.open(path) as image:
                    return {"image": load_image(image, size, self.channels, flip=flip).mul_(2).sub_(1)}
            except Exception as error:  # PIL raises many types for bad files
                reason = f"{type(error).__name__}: {error}"
                log.warning("skipping image %s that failed to decode (%s)", path, reason)
                if path not in self.recorded:  # once per process, not once per epoch
                    self.recorded.add(path)
                    record_bad(self.root, path, reason, self.cache_dir)
        raise GenlabError(f"no image under {self.root} could be decoded; check data.path.")


def _warn_mixed_modes(probes: list[str], channels: int, root: Path) -> None:
    """Warn when a few files' headers (cheap: no decoding) show several modes (RGB, L, RGBA...)."""
    modes = Counter()
    for path in probes:
        try:
            with Image.open(path) as image:
                modes[image.mode] += 1
        except Exception:  # found and reported when training reaches it
            continue
    if len(modes) > 1:
        target = "RGB" if channels == 3 else "L"
        log.warning("images under %s come in several modes (%s in %d files read); each is converted to %s as "
                    "data.channels=%d asks, so alpha channels are dropped and colour is lost in grey images.", root,
                    ", ".join(f"{m}: {n}" for m, n in sorted(modes.items())), len(probes), target, channels)
