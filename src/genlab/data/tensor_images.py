"""An in-memory image dataset that hands out whole batches by indexing once."""

from __future__ import annotations

import torch


class TensorImages(torch.utils.data.Dataset):
    """Images (N, C, H, W) in [-1, 1] and optional labels (N,), kept in memory.

    `get_batch(indices)` indexes the tensors once per batch, which is why small data
    (digits) trains at the speed of a bare loop: no per-item Python, no collate.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images, self.labels = images, labels
        self.item_keys = ("image", "label") if labels is not None else ("image",)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item

    def get_batch(self, indices: torch.Tensor) -> dict:
        indices = indices.to(self.images.device)
        batch = {"image": self.images[indices]}
        if self.labels is not None:
            batch["label"] = self.labels[indices]
        return batch

    def to(self, device: torch.device) -> "TensorImages":
        """Keep the whole dataset on `device` (a GPU-resident dataset for small data)."""
        self.images = self.images.to(device)
        self.labels = None if self.labels is None else self.labels.to(device)
        return self
