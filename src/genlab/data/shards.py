"""Sharded data streamed from local disk or object storage: webdataset tar shards.

Layout (what `genlab data pack` writes): `PATH/train.json` and `PATH/val.json`, each a
wids shard index ({"shardlist": [{"url": "train-000000.tar", "nsamples": 1000}, ...]},
URLs relative to the index), and the tar shards, whose samples hold `KEY.<image ext>`,
and where they exist `KEY.txt` (caption), `KEY.sketch.png` (sketch) and `KEY.cls` (label).
PATH is a folder, s3:// or gs:// (fsspec), https:// or hf:// (curl), or a `pipe:` command
typed on the command line; an index names only shards inside its own folder. What may
open and how is genlab/urls.py's business: no string from a file ever reaches a shell.

The order (`ShardOrder`) keeps the loop's promise of exact resume: epoch e shuffles the
shards by (seed, e) and deals them round-robin to the readers (processes x DataLoader
workers); each reader streams its shards one after another, each shard's samples in an
order drawn from (seed, e, shard). A batch is named by (epoch, reader, position), so a
resumed run skips whole shards by their counts and re-reads only the one it stopped in.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from torch.utils.data import Dataset

from genlab import urls
from genlab.data.images import IMAGE_SUFFIXES, load_image
from genlab.errors import ConfigError, GenlabError

log = logging.getLogger(__name__)
IMAGE_EXTS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)


def read_index(path: str, split: str) -> tuple[list[str], list[int], dict]:
    """(shard URLs, samples per shard, genlab metadata) of `split` under `path`.

    A `pipe:` path must be allowed (urls.check_command) and every shard name must lie inside
    the index's folder (urls.shard_url): both are checked before anything is opened or run.
    """
    urls.check_command(path, "data.path")
    where = urls.join(path, f"{split}.json")
    try:
        with urls.open_url(where, command_ok=urls.is_command(path)) as f:
            index = json.load(f)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the shard index {where} ({error}); data.path must hold train.json and "
                          "val.json as `genlab data pack SRC OUT` writes them.") from None
    shards = index.get("shardlist", []) if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise ConfigError(f"{where} is not a shard index (a 'shardlist' of {{url, nsamples}}); pack the data again.")
    base = path.rstrip("/") if urls.is_url(path) else str(Path(path).expanduser())
    found = [urls.shard_url(where, base, s.get("url"), i) for i, s in enumerate(shards)]
    return found, [int(s["nsamples"]) for s in shards], index.get("genlab", {})


@lru_cache(maxsize=2)  # the shard each reader of this process is in, and the next one
def _shard_samples(url: str, command_ok: bool = False) -> list[dict[str, Any]]:
    """Every sample of one shard, as webdataset groups them ({"__key__", "png": bytes, "txt": ...}).

    Args:
        command_ok: `url` extends a `pipe:` data.path that read_index allowed.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        with urls.open_url(url, command_ok=command_ok) as stream:
            return list(group_by_keys(tar_file_expander([{"url": url, "stream": stream}])))
    except GenlabError:  # a refused URL, a missing fsspec package: already one sentence
        raise
    except Exception as error:  # tar, network and pipe errors come in many types
        raise GenlabError(f"cannot read the shard {url} ({type(error).__name__}: {error}); check that it exists "
                          "and is a complete tar file (`genlab data pack` writes them).") from None


class ShardOrder:
    """Which samples make up batch `b` of epoch `e` on this process, as (epoch, reader, position) keys.

    Each reader (one per process and DataLoader worker) gets every `readers`-th shard of
    the epoch's shuffled shard list. Every reader stops after the same number of batches,
    the fewest any reader can hold, so every process sees the same epoch length; the rest
    of a longer reader's samples (at most about one shard) waits for a later epoch, whose
    shuffle deals the shards differently.
    """

    def __init__(self, counts: list[int], batch_size: int, seed: int, rank: int, world_size: int,
                 readers_per_process: int):
        self.counts, self.batch_size, self.seed = counts, batch_size, seed
        self.rank, self.per_process = rank, readers_per_process
        self.readers = world_size * readers_per_process
        if len(counts) < self.readers:
            raise ValueError(f"{len(counts)} shards cannot feed {self.readers} readers ({world_size} processes x "
                             f"{readers_per_process} DataLoader workers); pack smaller shards or use fewer workers")
        fewest = sum(sorted(counts)[: len(counts) // self.readers])  # the smallest share any reader can get
        self.batches_per_epoch = readers_per_process * (fewest // batch_size)
        self.n = sum(counts)
        if self.batches_per_epoch == 0:
            raise ValueError(f"a reader's share of the shards ({fewest} samples) holds no batch of {batch_size}; "
                             "lower trainer.batch_size or pack more samples")

    @lru_cache(maxsize=64)  # asked for every sample: keep the current epoch's answers
    def reader_shards(self, epoch: int, reader: int) -> list[int]:
        """The shards `reader` streams in `epoch`, in order."""
        perm = torch.randperm(len(self.counts), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return perm[reader::self.readers].tolist()

    @lru_cache(maxsize=64)
    def shard_order(self, epoch: int, shard: int) -> list[int]:
        """The order in which `shard`'s samples are read in `epoch`."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + shard)
        return torch.randperm(self.counts[shard], generator=generator).tolist()

    @lru_cache(maxsize=64)
    def reader_ends(self, epoch: int, reader: int) -> list[int]:
        """Cumulative sample counts of `reader`'s shards in `epoch`."""
        return _cumulative([self.counts[s] for s in self.reader_shards(epoch, reader)])

    def epoch_keys(self, epoch: int, start: int) -> Iterator[list[tuple[int, int, int]]]:
        """This process's batches of `epoch` from batch `start` on: batch j comes from this
        process's reader j % readers_per_process, its (j // readers_per_process)-th batch."""
        for j in range(start, self.batches_per_epoch):
            reader = self.rank * self.per_process + j % self.per_process
            first = (j // self.per_process) * self.batch_size
            yield [(epoch, reader, first + i) for i in range(self.batch_size)]

    def item_dataset(self, dataset: "Shards") -> Dataset:
        return _ShardItems(dataset, self)


class _ShardItems(Dataset):
    """What the DataLoader indexes: an (epoch, reader, position) key -> that sample's item."""

    def __init__(self, dataset: "Shards", order: ShardOrder):
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:
        return self.order.n

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, reader, position = key
        shards = self.order.reader_shards(epoch, reader)
        ends = self.order.reader_ends(epoch, reader)
        k = bisect.bisect_right(ends, position)
        shard, offset = shards[k], position - (ends[k - 1] if k else 0)
        order = self.order.shard_order(epoch, shard)
        # The augmentation of a sample depends on (seed, epoch, sample), not on which worker reads it.
        sample_id = self.dataset.offsets[shard] + order[offset]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.order.seed * 1_000_003 + epoch * self.order.n + sample_id) % (2**63))
            return self.dataset.decode_from(shard, order, offset)


def _cumulative(counts: list[int]) -> list[int]:
    ends, total = [], 0
    for c in counts:
        total += c
        ends.append(total)
    return ends


class Shards(Dataset):
    """A split of sharded data: streamed in training (`order`), read in stored order by index
    (validation items, `genlab sample`).

    Args:
        path: folder or URL holding `train.json`, `val.json` and the shards.
        split: "train" or "val".
        image_size: images (and sketches) are resized to cover it and centre-cropped.
        channels: 3 (RGB) or 1 (grey).
        random_flip: mirror image and sketch together at random in training.
    """

    def __init__(self, path: str, split: str = "train", image_size: int = 64, channels: int = 3,
                 random_flip: bool = True):
        self.urls, self.counts, meta = read_index(str(path), split)
        self.command_ok = urls.is_command(str(path))  # allowed by read_index, or it would have raised
        if not self.urls:
            raise ConfigError(f"{path}/{split}.json lists no shards; pack some data with `genlab data pack SRC OUT`.")
        self.offsets = [0, *_cumulative(self.counts)[:-1]]
        self.image_size, self.channels = image_size, channels
        self.random_flip = random_flip and split == "train"
        self.item_keys = ("image", *[k for k in ("caption", "sketch", "label") if k in meta.get("keys", ())])
        self.skipped = 0  # bad samples skipped by this process (each is also logged)

    def __len__(self) -> int:
        return sum(self.counts)

    def order(self, batch_size: int, seed: int, rank: int, world_size: int, readers_per_process: int) -> ShardOrder:
        return ShardOrder(self.counts, batch_size, seed, rank, world_size, readers_per_process)

    def __getitem__(self, i: int) -> dict:
        shard = bisect.bisect_right(self.offsets, int(i)) - 1
        return self.decode_from(shard, list(range(self.counts[shard])), int(i) - self.offsets[shard])

    def decode_from(self, shard: int, order: list[int], offset: int) -> dict:
        """The item at `order[offset]` of `shard`; a sample that does not decode is logged, counted
        and replaced by the next one in `order`."""
        samples = _shard_samples(self.urls[shard], self.command_ok)
        if len(samples) != self.counts[shard]:
            raise GenlabError(f"the shard {self.urls[shard]} holds {len(samples)} samples, its index says "
                              f"{self.counts[shard]}; pack the data again.")
        for attempt in range(len(order)):
            sample = samples[order[(offset + attempt) % len(order)]]
            try:
                return self._decode(sample)
            except Exception as error:  # PIL and decoding errors come in many types
                self.skipped += 1
                log.warning("skipping sample %s of %s that failed to decode (%s: %s); %d skipped so far here",
                            sample.get("__key__"), self.urls[shard], type(error).__name__, error, self.skipped)
        raise GenlabError(f"no sample of the shard {self.urls[shard]} decodes; pack the data again.")

    def _decode(self, sample: dict[str, Any]) -> dict:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise ValueError(f"no image in the sample (it has {', '.join(k for k in sample if not k.startswith('__'))})")
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        size = self.image_size
        item = {"image": load_image(Image.open(io.BytesIO(sample[ext])), size, self.channels, flip=flip).mul_(2).sub_(1)}
        if "caption" in self.item_keys:
            item["caption"] = sample.get("txt", b"").decode("utf-8")
        if "sketch" in self.item_keys:
            item["sketch"] = load_image(Image.open(io.BytesIO(sample["sketch.png"])), size, 3,
                                        Image.Resampling.BILINEAR, flip=flip)
        if "label" in self.item_keys:
            item["label"] = int(sample["cls"])
        return item
