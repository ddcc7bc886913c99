"""Image files and pixels, for every dataset and command: the one list of image suffixes,
the one resize-and-crop, the one way to turn a file or a PIL image into a tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from genlab.errors import GenlabError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ORIENTATION = 0x0112  # the EXIF tag that says how a photo was turned
#: The most pixels genlab decodes from one image (8192 x 8192, 192 MB as RGB). Checked on the
#: header, before decoding: a crafted 13000 x 13000 PNG of a few kB would take 0.5 GB per worker.
MAX_PIXELS = 8192 * 8192


def resize_crop(image: Image.Image, size: int | tuple[int, int], resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Scale `image` to cover `size` (a side, or (width, height)), then centre-crop to it."""
    width, height = (size, size) if isinstance(size, int) else size
    # ImageOps.fit crops to the aspect ratio first and resizes the crop: less work than resizing the whole.
    return ImageOps.fit(image, (width, height), method=resample)


def to_tensor(image: Image.Image, channels: int = 3) -> torch.Tensor:
    """A PIL image as (channels, H, W) float in [0, 1] (converted to RGB or grey first)."""
    mode = "RGB" if channels == 3 else "L"
    if image.mode != mode:
        image = image.convert(mode)
    # uint8 to torch first, then one float conversion: 3x faster than numpy's float32 asarray on small images.
    array = np.array(image).reshape(image.height, image.width, channels)  # a writable copy for torch
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def load_image(source: str | Path | Image.Image, size: int | tuple[int, int], channels: int = 3,
               resample=Image.Resampling.BICUBIC, flip: bool = False) -> torch.Tensor:
    """A file or PIL image, upright (EXIF), resized to cover `size`, centre-cropped, optionally mirrored.

    Args:
        source: a path or an open PIL image.
        size: the output side, or (width, height).
        channels: 3 (RGB) or 1 (grey).
        resample: PIL's resampling filter (bilinear suits line drawings).
        flip: mirror left-right (a training augmentation).

    Returns:
        (channels, H, W) float in [0, 1].

    Raises:
        GenlabError: the file is missing or is not a readable image.
    """
    if isinstance(source, Image.Image):
        return _pixels(source, size, channels, resample, flip)
    path = Path(source)
    if not path.is_file():
        raise GenlabError(f"{path} does not exist (or is not a file); check the path.")
    try:
        with Image.open(path) as image:
            return _pixels(image, size, channels, resample, flip)
    except (OSError, ValueError, SyntaxError) as error:  # truncated, corrupt, not an image
        raise GenlabError(f"{path} cannot be read as an image ({error}); replace or remove it.") from None


def _pixels(image: Image.Image, size, channels: int, resample, flip: bool) -> torch.Tensor:
    if image.width * image.height > MAX_PIXELS:
        name = getattr(image, "filename", "") or "an image"
        raise GenlabError(f"{name} is {image.width} x {image.height} pixels, more than genlab decodes "
                          f"({MAX_PIXELS:,}); downscale it or leave it out.")
    if image.getexif().get(ORIENTATION, 1) != 1:  # most files need no turn: spare them exif_transpose's copy
        image = ImageOps.exif_transpose(image)
    mode = "RGB" if channels == 3 else "L"
    image = resize_crop(image if image.mode == mode else image.convert(mode), size, resample)
    if flip:
        image = ImageOps.mirror(image)
    return to_tensor(image, channels)
