"""Datasets and the resumable batch order shared by every family.

A dataset config (configs/data/*.yaml) is the dataset class's arguments plus a few
loader keys that the loop reads itself (LOADER_KEYS). Items are dicts: "image"
(C, H, W) float in [-1, 1], and optionally "label", "caption", "sketch"; batches are
collated items plus what the batch stream adds (BATCH_KEYS).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import default_collate

from genlab.errors import ConfigError

#: The keys a batch may hold (a family's `loss` reads those it needs), each with what it is. Items give the
#: first four (or other keys their dataset documents); the batch stream adds "latent_cache" itself.
BATCH_KEYS = {
    "image": "(B, C, H, W) float in [-1, 1]: always",
    "label": "(B,) int classes, from labelled data",
    "caption": "a list of B captions (str)",
    "sketch": "(B, 3, H, W) float in [0, 1], from paired data",
    "latent_cache": "with data.cache_latents=true: the folder (str) where latent diffusion families keep each "
                    "image's VAE posterior and each caption's text encoding (data/latent_cache.py); absent when off",
}

# Keys of a data config that configure loading, not the dataset class.
LOADER_KEYS = ("num_workers", "num_classes", "pin_memory", "persistent_workers", "prefetch_factor", "on_device",
               "cache_latents", "latent_cache_dir")


@runtime_checkable
class ImageDataset(Protocol):
    """What the loop, `genlab sample` and `genlab eval` need from a dataset (one per split).

    Eval picks its metrics from `item_keys`: class metrics for "label", sketch-following
    metrics for "sketch", caption metrics for "caption".
    """

    #: what every item holds: "image" ((C, H, W) in [-1, 1]) always; "label" (int class),
    #: "caption" (str), "sketch" ((3, H, W) in [0, 1]), or other keys the dataset documents.
    item_keys: tuple[str, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@runtime_checkable
class InMemory(Protocol):
    """Small data kept as tensors: whole batches by one indexing op (no DataLoader, no collate),
    GPU-resident on a GPU (`data.on_device`)."""

    def get_batch(self, indices: torch.Tensor) -> dict[str, Any]: ...

    def to(self, device: torch.device) -> "InMemory": ...


@runtime_checkable
class ColourCaptions(Protocol):
    """Captions name a colour of `palette` (fill_circles): eval scores whether images show it."""

    palette: dict[str, tuple[int, int, int]]


def build_dataset(data_cfg: DictConfig, split: str) -> Any:
    """Instantiate the dataset of `data_cfg` for `split` ("train" or "val")."""
    kwargs = {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in LOADER_KEYS}
    from genlab.config import build

    return build("data", kwargs, split=split)


def split_indices(n: int, split: str, val_fraction: float, split_seed: int,
                  stratify: Sequence[int] | None = None) -> list[int]:
    """The train/val partition every dataset uses: sorted indices of `split` among range(n).

    Args:
        n: number of items.
        split: "train" or "val".
        val_fraction: share held out for "val"; val gets at least one item when n > 1 and
            val_fraction > 0, train keeps at least one.
        split_seed: fixes the partition.
        stratify: a class per item: each class is split in the same proportion (as
            scikit-learn's train_test_split, which does the work then).
    """
    if split not in ("train", "val"):
        raise ConfigError(f"unknown split {split!r}; use 'train' or 'val'.")
    if stratify is not None:
        from sklearn.model_selection import train_test_split

        train, val = train_test_split(np.arange(n), test_size=val_fraction, random_state=split_seed,
                                      stratify=np.asarray(stratify))
        return sorted(int(i) for i in (val if split == "val" else train))
    order = np.random.default_rng(split_seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    chosen = order[:n_val] if split == "val" else order[n_val:]
    return sorted(int(i) for i in chosen)


def collate_items(dataset: Any, indices: list[int] | torch.Tensor) -> dict[str, Any]:
    """Items `indices` of `dataset` as one batch: tensors stacked, captions as lists."""
    if isinstance(dataset, InMemory):  # one indexing op
        return dataset.get_batch(torch.as_tensor(indices))
    return default_collate([dataset[int(i)] for i in indices])
