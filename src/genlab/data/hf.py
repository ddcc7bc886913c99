"""Hugging Face `datasets`: the one loader (hub name, `save_to_disk` directory or builder) and
an image dataset over it."""

from __future__ import annotations

from pathlib import Path

import torch

from genlab.data import split_indices
from genlab.data.images import load_image
from genlab.errors import ConfigError, GenlabError


def load_hf_split(name: str, split: str, data_dir: str | None = None):
    """One split of a dataset: a `save_to_disk` directory (a DatasetDict or a single Dataset),
    a builder such as "imagefolder" (with `data_dir`), or a hub name."""
    import datasets

    local = Path(name).expanduser()
    if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"split {split!r} is not in {name} (it has {', '.join(ds)}); set data.hf_split.")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as error:  # hub, network and builder errors come in many types
        raise GenlabError(f"could not load the Hugging Face dataset data.name={name} split={split}: {error}. "
                          "Offline, use a local path or a builder such as data.name=imagefolder data.data_dir=DIR.")


def hf_rows(name: str, split: str, data_dir: str | None, hf_split: str, val_split: str | None,
            val_fraction: float, split_seed: int):
    """(dataset, rows) of genlab's `split`: the dataset's `val_split` for "val" when given, else
    the `split_indices` partition of `hf_split`."""
    if split == "val" and val_split is not None:
        ds = load_hf_split(name, val_split, data_dir)
        return ds, list(range(len(ds)))
    ds = load_hf_split(name, hf_split, data_dir)
    return ds, split_indices(len(ds), split, val_fraction if val_split is None else 0.0, split_seed)


def check_columns(ds, name: str, *columns: str | None) -> None:
    for column in columns:
        if column is not None and column not in ds.column_names:
            raise ConfigError(f"column {column!r} not in the dataset {name} (columns: {ds.column_names}); "
                              "set data.image_column / data.label_column / data.caption_column.")


class HFImages(torch.utils.data.Dataset):
    """Images (and optional integer labels) from a `datasets` split, resized and cropped."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None, image_column: str = "image",
                 label_column: str | None = None, val_split: str | None = None, val_fraction: float = 0.05,
                 split_seed: int = 0, image_size: int = 32, channels: int = 3, random_flip: bool = True,
                 hf_split: str = "train"):
        # `split` is genlab's "train"/"val"; `hf_split` / `val_split` name the dataset's own splits.
        ds, self.rows = hf_rows(name, split, data_dir, hf_split, val_split, val_fraction, split_seed)
        check_columns(ds, name, image_column, label_column)
        self.ds, self.image_column, self.label_column = ds, image_column, label_column
        self.item_keys = ("image", "label") if label_column else ("image",)
        self.image_size, self.channels = image_size, channels
        self.random_flip = random_flip and split == "train"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[self.rows[int(i)]]
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        item = {"image": load_image(row[self.image_column], self.image_size, self.channels, flip=flip) * 2 - 1}
        if self.label_column is not None:
            item["label"] = int(row[self.label_column])
        return item
