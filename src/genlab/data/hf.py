"""A Hugging Face `datasets` image dataset: hub name, saved dataset directory, or builder."""

from __future__ import annotations

from pathlib import Path

import torch

from genlab.data.imagefolder import image_to_tensor
from genlab.errors import GenlabError


def load_hf_split(name: str, split: str, data_dir: str | None = None):
    """Load one split: a `save_to_disk` directory, a builder (e.g. "imagefolder") or a hub name."""
    import datasets

    if Path(name).expanduser().is_dir() and (Path(name).expanduser() / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(Path(name).expanduser()))[split]
    if Path(name).expanduser().is_dir() and (Path(name).expanduser() / "dataset_info.json").exists():
        return datasets.load_from_disk(str(Path(name).expanduser()))
    try:
        return datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as error:
        raise GenlabError(f"could not load the Hugging Face dataset data.name={name} split={split}: {error}. "
                          "Offline, use a local path or a builder such as data.name=imagefolder data.data_dir=DIR.")


class HFImages(torch.utils.data.Dataset):
    """Images (and optional integer labels) from a `datasets` split, resized and cropped."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None, image_column: str = "image",
                 label_column: str | None = None, val_split: str | None = None, val_fraction: float = 0.05,
                 split_seed: int = 0, image_size: int = 32, channels: int = 3, random_flip: bool = True,
                 hf_split: str = "train"):
        # `split` is genlab's "train"/"val"; `hf_split` / `val_split` name the dataset's own splits.
        which = split
        if val_split is not None:
            ds = load_hf_split(name, val_split if which == "val" else hf_split, data_dir)
        else:
            full = load_hf_split(name, hf_split, data_dir)
            parts = full.train_test_split(test_size=val_fraction, seed=split_seed) if len(full) > 1 else {"train": full, "test": full}
            ds = parts["test" if which == "val" else "train"]
        for column in (image_column, label_column):
            if column is not None and column not in ds.column_names:
                raise GenlabError(f"column {column!r} not in the dataset (columns: {ds.column_names}); "
                                  "set data.image_column / data.label_column.")
        self.ds, self.image_column, self.label_column = ds, image_column, label_column
        self.item_keys = ("image", "label") if label_column else ("image",)
        self.image_size, self.channels = image_size, channels
        self.random_flip = random_flip and which == "train"

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[int(i)]
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        item = {"image": image_to_tensor(row[self.image_column], self.image_size, self.channels, flip)}
        if self.label_column is not None:
            item["label"] = int(row[self.label_column])
        return item
