"""Any folder of images, searched recursively, with bad files skipped and reported."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from genlab.errors import GenlabError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_to_tensor(image: Image.Image, image_size: int, channels: int, flip: bool = False) -> torch.Tensor:
    """Resize the shorter side to `image_size`, centre-crop, optionally flip; (C, H, W) in [-1, 1]."""
    image = ImageOps.exif_transpose(image).convert("RGB" if channels == 3 else "L")
    image = ImageOps.fit(image, (image_size, image_size), method=Image.Resampling.BICUBIC)
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32).reshape(image_size, image_size, channels)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _inspect(path: Path) -> tuple[str | None, str | None]:
    """(mode, None) if `path` opens as an image (mode as PIL names it: RGB, L, RGBA, P...), else (None, why not)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        with Image.open(path) as image:  # by content: a PNG named .jpg is still read
            image.verify()  # checks the header and (for PNG) the checksums without decoding
            return image.mode, None
    except Exception as error:  # PIL raises many types for bad files
        return None, f"{type(error).__name__}: {error}"


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `path` (recursively), split into train/val by a seeded shuffle.

    Unreadable files (zero bytes, corrupt, truncated, not an image despite the suffix) are
    skipped with a warning naming each; if more than `max_bad_fraction` of the files are
    bad the dataset refuses to load and lists them.
    """

    item_keys = ("image",)

    def __init__(self, path: str, split: str = "train", image_size: int = 64, channels: int = 3,
                 val_fraction: float = 0.05, split_seed: int = 0, random_flip: bool = True,
                 max_bad_fraction: float = 0.01):
        root = Path(path).expanduser()
        if not root.is_dir():
            raise GenlabError(f"data.path={path} is not a folder; point data.path at a folder of images.")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise GenlabError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}; "
                              "check data.path.")
        inspected = {f: _inspect(f) for f in files}
        bad = {f: reason for f, (_, reason) in inspected.items() if reason is not None}
        for f, reason in bad.items():
            log.warning("skipping unreadable image %s (%s)", f, reason)
        if len(bad) > max_bad_fraction * len(files):
            listing = "\n  ".join(f"{f}: {r}" for f, r in bad.items())
            raise GenlabError(f"{len(bad)} of {len(files)} images under {root} cannot be read "
                              f"(more than data.max_bad_fraction={max_bad_fraction}); fix or remove them:\n  {listing}")
        good = [f for f in files if f not in bad]
        modes = Counter(mode for mode, _ in inspected.values() if mode)
        if len(modes) > 1:
            target = "RGB" if channels == 3 else "L"
            log.warning("images under %s come in %d modes (%s); each is converted to %s as data.channels=%d asks, "
                        "so alpha channels are dropped and colour is lost in grey images.", root, len(modes),
                        ", ".join(f"{m}: {n}" for m, n in sorted(modes.items())), target, channels)
        perm = torch.randperm(len(good), generator=torch.Generator().manual_seed(split_seed)).tolist()
        n_val = max(1, round(val_fraction * len(good))) if len(good) > 1 else 0
        chosen = perm[:n_val] if split == "val" else perm[n_val:]
        self.files = [good[i] for i in sorted(chosen)]
        self.image_size, self.channels = image_size, channels
        self.random_flip = random_flip and split == "train"
        self.bad_files: list[Path] = list(bad)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        # A file can still fail to decode (truncated after a valid header): warn, use the next one.
        for attempt in range(len(self.files)):
            path = self.files[(i + attempt) % len(self.files)]
            try:
                with Image.open(path) as image:
                    flip = self.random_flip and bool(torch.rand(()) < 0.5)
                    return {"image": image_to_tensor(image, self.image_size, self.channels, flip)}
            except Exception as error:
                log.warning("skipping image %s that failed to decode (%s)", path, error)
        raise GenlabError(f"no image under {self.files[0].parent} could be decoded")
