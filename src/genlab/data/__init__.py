"""Datasets and the resumable batch order shared by every family.

A dataset config (configs/data/*.yaml) is the dataset class's arguments plus a few
loader keys that the loop reads itself (LOADER_KEYS). Items are dicts: "image"
(C, H, W) float in [-1, 1], and optionally "label", "caption", "sketch".
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# Keys of a data config that configure loading, not the dataset class.
LOADER_KEYS = ("num_workers", "num_classes", "pin_memory", "persistent_workers", "prefetch_factor", "on_device")


def build_dataset(data_cfg: DictConfig, split: str) -> Any:
    """Instantiate the dataset of `data_cfg` for `split` ("train" or "val")."""
    kwargs = {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in LOADER_KEYS}
    return instantiate(kwargs, split=split, _convert_="all")
