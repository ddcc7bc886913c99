"""fill_circles: a procedural sketch-to-image set like the ControlNet paper's fill50k.

Each item is a circle: the *sketch* is its outline (white on black), the *image* is the
same circle filled with one named colour on a background of another, and the *caption*
names both colours ("a red circle on a blue background"). Items are drawn on the fly from
`(seed, split, index)`, so any index is the same in every process and every run, and
the ground-truth circle stays available for metrics (disc IoU, colour accuracy).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from genlab.errors import ConfigError

#: Named colours (RGB 0-255), far apart so that a generated colour can be named back.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "cyan": (40, 210, 220),
    "magenta": (210, 40, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_NAMES = list(PALETTE)
_SPLITS = {"train": 0, "val": 1}


def caption_for(fill: str, background: str) -> str:
    return f"a {fill} circle on a {background} background"


def render_circle(
    size: int, cx: float, cy: float, r: float, fill: str, background: str, outline_width: float = 1.5
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one item.

    Args:
        size: image side in pixels.
        cx, cy, r: circle centre and radius in pixels (pixel centres sit at i + 0.5).
        fill, background: names from `PALETTE`.
        outline_width: sketch line width in pixels.

    Returns:
        (image, sketch): uint8 arrays (size, size, 3); the image's disc is exactly
        `distance <= r`, the sketch is white where `|distance - r| <= outline_width / 2`.
    """
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dist = np.hypot(xs - cx, ys - cy)
    disc = dist <= r
    image = np.empty((size, size, 3), np.uint8)
    image[:] = PALETTE[background]
    image[disc] = PALETTE[fill]
    # At least one pixel wide, so that tiny images still get a closed outline.
    half = max(outline_width, 1.0) / 2
    sketch = np.zeros((size, size, 3), np.uint8)
    sketch[np.abs(dist - r) <= half] = 255
    return image, sketch


def disc_mask(size: int, circle: torch.Tensor) -> torch.Tensor:
    """(size, size) bool mask of the disc (cx, cy, r) in pixels, as `render_circle` draws it."""
    cx, cy, r = (float(v) for v in circle)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return torch.hypot(xs - cx, ys - cy) <= r


class FillCircles(Dataset):
    """Circle outline sketches, filled-circle targets and colour captions.

    Args:
        split: "train" or "val"; the two draw from different random streams.
        image_size: side of the square images in pixels.
        channels: must be 3 (the colours are the point).
        count: number of train items.
        val_count: number of val items.
        radius_range: (min, max) radius as a fraction of image_size.
        outline_width: sketch line width in pixels (scaled up with image_size by default
            via the config).
        seed: dataset seed; item i of a split is a pure function of (seed, split, i).

    Items are dicts: "image" (3, H, W) in [-1, 1], "sketch" (3, H, W) in [0, 1],
    "caption" str, "circle" (3,) float (cx, cy, r) in pixels, "fill" and "background"
    as palette indices (long) for colour-accuracy metrics.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        channels: int = 3,
        count: int = 5000,
        val_count: int = 256,
        radius_range: tuple[float, float] = (0.12, 0.35),
        outline_width: float = 1.5,
        seed: int = 0,
    ):
        if split not in _SPLITS:
            raise ConfigError(f"fill_circles: unknown split {split!r}; use 'train' or 'val'.")
        if channels != 3:
            raise ConfigError(f"data.channels={channels}: fill_circles is RGB; set data.channels=3.")
        lo, hi = radius_range
        if not 0 < lo <= hi < 0.5:
            raise ConfigError(f"data.radius_range={list(radius_range)}: need 0 < min <= max < 0.5 "
                              "(fractions of image_size).")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.count = count if split == "train" else val_count
        self.radius_range = (lo, hi)
        self.outline_width = outline_width
        self.item_keys = ("image", "sketch", "caption", "circle", "fill", "background")
        self.palette = PALETTE

    def __len__(self) -> int:
        return self.count

    def params(self, index: int) -> tuple[float, float, float, int, int]:
        """(cx, cy, r, fill index, background index) of item `index`, from its own RNG."""
        if not 0 <= index < self.count:
            raise IndexError(f"fill_circles {self.split}: index {index} out of range ({self.count} items)")
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        size = self.image_size
        r = rng.uniform(*self.radius_range) * size
        # Keep the whole disc inside the image.
        cx, cy = rng.uniform(r, size - r, size=2)
        fill, background = rng.choice(len(PALETTE), size=2, replace=False)
        return float(cx), float(cy), float(r), int(fill), int(background)

    def __getitem__(self, index: int) -> dict:
        cx, cy, r, fill, background = self.params(index)
        fill_name, bg_name = COLOUR_NAMES[fill], COLOUR_NAMES[background]
        image, sketch = render_circle(self.image_size, cx, cy, r, fill_name, bg_name, self.outline_width)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0,
            "sketch": torch.from_numpy(sketch).permute(2, 0, 1).float() / 255.0,
            "caption": caption_for(fill_name, bg_name),
            "circle": torch.tensor([cx, cy, r], dtype=torch.float32),
            "fill": torch.tensor(fill),
            "background": torch.tensor(background),
        }
