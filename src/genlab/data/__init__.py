"""Datasets and the resumable batch order shared by every family.

A dataset config (configs/data/*.yaml) is the dataset class's arguments plus a few
loader keys that the loop reads itself (LOADER_KEYS). Items are dicts: "image"
(C, H, W) float in [-1, 1], and optionally "label", "caption", "sketch".
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import default_collate

# Keys of a data config that configure loading, not the dataset class.
LOADER_KEYS = ("num_workers", "num_classes", "pin_memory", "persistent_workers", "prefetch_factor", "on_device")


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


def collate_items(dataset: Any, indices: list[int] | torch.Tensor) -> dict[str, Any]:
    """Items `indices` of `dataset` as one batch: tensors stacked, captions as lists."""
    if isinstance(dataset, InMemory):  # one indexing op
        return dataset.get_batch(torch.as_tensor(indices))
    return default_collate([dataset[int(i)] for i in indices])
