"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, shipped offline."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from genlab.data import split_indices
from genlab.data.tensor_images import TensorImages


class Digits(TensorImages):
    """Digits upsampled to `image_size`, scaled to [-1, 1], with a stratified split.

    Args:
        split: "train" or "val".
        image_size: output side length (bilinear upsampling from 8 px).
        channels: 1 (grey) or 3 (grey repeated, for RGB models).
        val_fraction: fraction held out for "val", stratified by class.
        split_seed: seed of the split.
        exclude_classes: classes removed from "train" only (for anomaly detection).
    """

    def __init__(self, split: str = "train", image_size: int = 16, channels: int = 1, val_fraction: float = 0.1,
                 split_seed: int = 0, exclude_classes: list[int] | tuple[int, ...] = ()):
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
        labels = torch.from_numpy(digits.target.astype(np.int64))
        idx = torch.tensor(split_indices(len(labels), split, val_fraction, split_seed, stratify=labels.tolist()))
        images, labels = images[idx], labels[idx]
        if split == "train" and len(exclude_classes):
            keep = ~torch.isin(labels, torch.tensor(list(exclude_classes)))
            images, labels = images[keep], labels[keep]
        if image_size != 8:
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        images = (images.clamp(0, 1) * 2 - 1).repeat(1, channels, 1, 1).contiguous()
        super().__init__(images, labels)
