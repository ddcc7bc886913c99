"""Sketch/image pairs from any images: edge extraction (Canny, XDoG), cached on disk.

`SketchPairs` wraps a *source*: a sequence of `Source` records (an image, a caption,
and optionally a ready-made sketch). Two builders make one from what users have:

- `sketch_folder`: a folder of images; captions from `NAME.txt` beside each image, or
  from the folder's `metadata.jsonl` (the HF imagefolder layout), or one fixed caption.
- `sketch_hf`: a Hugging Face dataset (a local `save_to_disk` dir, a hub name or a
  builder). A `conditioning_image` column (the fill50k hub layout) is used as the sketch
  as it is; otherwise edges are extracted.

Sketches are white lines on black, (3, H, W) in [0, 1], like fill_circles. In training
the edge thresholds are drawn per item from `(seed, index)`, so the same index always
gives the same sketch and the cache (keyed by source file + parameters) stays valid.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from genlab.config import cache_root
from genlab.data import split_indices
from genlab.data.buckets import assign_buckets, bucket_sizes
from genlab.data.file_list import folder_metadata, list_images
from genlab.data.hf import check_columns, hf_rows
from genlab.data.images import IMAGE_SUFFIXES, resize_crop, to_tensor
from genlab.errors import ConfigError, GenlabError


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges of an RGB uint8 image (H, W, 3): float (H, W), 1 on edges, 0 elsewhere."""
    # OpenCV takes the strongest gradient over the colour channels, so a red/blue edge of
    # equal brightness is still found (a grey conversion would lose it).
    return (cv2.Canny(np.ascontiguousarray(image), low, high) > 0).astype(np.float32)


def xdog(image: np.ndarray, sigma: float, eps: float, k: float = 1.6, tau: float = 0.98, phi: float = 200.0) -> np.ndarray:
    """Soft pencil-like lines by the extended difference of Gaussians (Winnemöller 2012).

    Args:
        image: RGB uint8 (H, W, 3).
        sigma: the smaller Gaussian's std in pixels (bigger: thicker, fewer lines).
        eps: threshold on the difference (lower: fewer lines).
        k, tau, phi: ratio of the two sigmas, weight of the wider one, tanh steepness.

    Returns:
        float (H, W) in [0, 1]: 1 on lines, 0 on flat areas (inverted XDoG).
    """
    rgb = image.astype(np.float32) / 255.0
    diff = cv2.GaussianBlur(rgb, (0, 0), sigma) - tau * cv2.GaussianBlur(rgb, (0, 0), sigma * k)
    toned = np.where(diff >= eps, 1.0, 1.0 + np.tanh(phi * (diff - eps)))
    # Per colour channel, then the strongest line: equal-brightness colour edges still show.
    return (1.0 - toned.min(axis=2)).astype(np.float32)


@dataclass(frozen=True)
class EdgeParams:
    """How one sketch is drawn; `key()` names it in the cache."""

    method: str  # "canny" | "xdog"
    a: float  # canny: low threshold; xdog: sigma
    b: float  # canny: high threshold; xdog: eps

    def key(self) -> str:
        return f"{self.method}-{self.a:.4g}-{self.b:.4g}"

    def apply(self, image: np.ndarray) -> np.ndarray:
        return canny(image, self.a, self.b) if self.method == "canny" else xdog(image, self.a, self.b)


def edge_params(method: str, randomize: bool, seed: int, index: int, canny_low=(50, 150), canny_high=(150, 250),
                xdog_sigma=(0.6, 1.0), xdog_eps=(-0.01, 0.0)) -> EdgeParams:
    """Parameters for item `index`: random (but fixed by seed and index) or the range middles.

    `method` "random" picks canny or xdog per item.
    """
    rng = np.random.default_rng([seed, index])
    pick = (lambda lo_hi: float(rng.uniform(*lo_hi))) if randomize else (lambda lo_hi: float(np.mean(lo_hi)))
    if method == "random":
        method = "canny" if rng.random() < 0.5 else "xdog"
    if method == "canny":
        low = pick(canny_low)
        return EdgeParams("canny", low, max(pick(canny_high), low + 1))
    if method == "xdog":
        return EdgeParams("xdog", pick(xdog_sigma), pick(xdog_eps))
    raise ConfigError(f"data.edges={method!r}: use canny, xdog or random.")


def edges_of_image(image: torch.Tensor, method: str = "canny") -> torch.Tensor:
    """A sketch of one image, as in validation (mid-range thresholds).

    Args:
        image: (3, H, W) float in [0, 1] (what `genlab sample --edges-from` loads).
        method: "canny" or "xdog".

    Returns:
        (3, H, W) float in [0, 1], white lines on black.
    """
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    edges = edge_params(method, False, 0, 0).apply(pixels)
    return torch.from_numpy(edges)[None].expand(3, -1, -1).clone()


@dataclass
class Source:
    """One raw item: `key` names it for the cache (a file path + mtime, or a dataset row)."""

    key: str
    image: Callable[[], Image.Image]  # loaded lazily: the cache may make it unnecessary for the sketch
    caption: str
    sketch: Callable[[], Image.Image] | None = None


class SketchPairs(Dataset):
    """{"image", "sketch", "caption"} items from a sequence of `Source` records.

    Args:
        sources: the raw items of this split.
        image_size: output side; images are resized and centre-cropped.
        channels: image channels (3 RGB or 1 grey); sketches are always 3-channel.
        edges: "canny", "xdog" or "random" (one of the two per item).
        randomize: draw thresholds per item (training) instead of the fixed middles.
        seed: fixes the per-item thresholds.
        cache_dir: where extracted sketches are kept (None: sketches/ in `genlab.config.cache_root()`);
            `cache=False` turns caching off.
        sizes, bucket_of: with aspect-ratio buckets, each item's (width, height) and bucket;
            the sketch is drawn from (or resized to) its image's bucket.
        edge_ranges: canny_low, canny_high, xdog_sigma, xdog_eps (lo, hi) ranges.
    """

    def __init__(self, sources: Sequence[Source], image_size: int, channels: int = 3, edges: str = "canny",
                 randomize: bool = False, seed: int = 0, cache: bool = True, cache_dir: str | None = None,
                 sizes: list[tuple[int, int]] | None = None, bucket_of: list[int] | None = None,
                 **edge_ranges: Any):
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels}: use 3 (RGB) or 1 (grey).")
        edge_ranges = {k: tuple(v) for k, v in edge_ranges.items()}
        try:  # fail early on a bad method or an unknown range name
            edge_params(edges, False, 0, 0, **edge_ranges)
        except TypeError as e:
            raise ConfigError(f"sketch data: {e}; the edge ranges are canny_low, canny_high, xdog_sigma, xdog_eps.") from e
        self.sources, self.image_size, self.channels = sources, image_size, channels
        self.item_keys = ("image", "sketch", "caption")
        self.edges, self.randomize, self.seed, self.edge_ranges = edges, randomize, seed, edge_ranges
        self.cache_dir = Path(cache_dir or cache_root() / "sketches") if cache else None
        self.sizes = sizes
        if bucket_of is not None:  # only then: `Bucketed` datasets are those that have it
            self.bucket_of = bucket_of

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        src = self.sources[index]
        size = self.image_size if self.sizes is None else tuple(self.sizes[index])
        try:
            image = resize_crop(src.image().convert("RGB"), size)
            sketch = self._sketch(src, index, np.asarray(image), size)
        except (OSError, ValueError) as e:
            raise GenlabError(f"cannot read image {src.key}: {e}. Remove or replace the file.") from e
        return {
            "image": to_tensor(image, self.channels) * 2 - 1,
            "sketch": torch.from_numpy(sketch.astype(np.float32))[None].expand(3, -1, -1).clone(),
            "caption": src.caption,
        }

    def _sketch(self, src: Source, index: int, image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
        """(H, W) float sketch in [0, 1]: the source's own, or extracted edges (cached)."""
        if src.sketch is not None:
            grey = resize_crop(src.sketch().convert("L"), size, Image.BILINEAR)
            return np.asarray(grey, dtype=np.float32) / 255.0
        params = edge_params(self.edges, self.randomize, self.seed, index, **self.edge_ranges)
        if self.cache_dir is None:
            return params.apply(image)
        # "fit": images are cropped then resized (ImageOps.fit) since genlab 0.2; older entries differ slightly.
        digest = hashlib.sha1(f"{src.key}|{size}|fit|{params.key()}".encode()).hexdigest()
        path = self.cache_dir / digest[:2] / f"{digest}.png"
        if path.exists():
            return np.asarray(Image.open(path), dtype=np.float32) / 255.0
        sketch = params.apply(image)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so that a DataLoader worker never reads a half-written file.
        tmp = path.with_suffix(f".{os.getpid()}.tmp.png")
        Image.fromarray(np.round(sketch * 255).astype(np.uint8)).save(tmp)
        os.replace(tmp, path)
        return np.round(sketch * 255) / 255.0  # as it will read back from the cache


def sketch_folder(split: str, path: str, image_size: int, caption: str = "", val_fraction: float = 0.05,
                  split_seed: int = 0, buckets: dict | None = None, **kwargs: Any) -> SketchPairs:
    """Sketch pairs from a folder of images (searched recursively).

    Args:
        split: "train" (thresholds randomised) or "val" (fixed thresholds).
        path: the folder.
        caption: the caption of images that have neither NAME.txt nor a metadata.jsonl row.
        buckets: aspect-ratio buckets for the train split ({step, max_ratio}, see data/buckets.py),
            or None for square crops of image_size.
        kwargs: `SketchPairs` options (channels, edges, seed, cache, cache_dir, edge ranges);
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.path={path}: not a folder. Point it at a folder of images.")
    files, _ = list_images(root)
    if not files:
        raise ConfigError(f"data.path={path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found.")
    meta = {path: row.get("text", "") for path, row in folder_metadata(root).items()}

    def source(p: Path) -> Source:
        text = p.with_suffix(".txt")
        cap = text.read_text().strip() if text.exists() else meta.get(str(p.resolve()), caption)
        stat = p.stat()
        # partial, not lambda: DataLoader workers may need to pickle the sources.
        return Source(f"{p.resolve()}:{stat.st_mtime_ns}:{stat.st_size}", partial(Image.open, p), cap)

    chosen = [Path(files[i]) for i in split_indices(len(files), split, val_fraction, split_seed)]
    if buckets and split == "train":
        kwargs["sizes"], kwargs["bucket_of"] = assign_buckets(chosen, bucket_sizes(image_size, **buckets))
    return SketchPairs([source(p) for p in chosen], image_size, randomize=split == "train", **kwargs)


class _HFSources(Sequence):
    """`Source` records over rows of a datasets.Dataset (decoded lazily, row by row)."""

    def __init__(self, ds, rows: list[int], image_column: str, caption_column: str | None, sketch_column: str | None):
        self.ds, self.rows = ds, rows
        self.columns = image_column, caption_column, sketch_column
        self.fingerprint = getattr(ds, "_fingerprint", "nofingerprint")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Source:
        row = self.ds[self.rows[i]]
        image_col, caption_col, sketch_col = self.columns
        caption = str(row[caption_col]) if caption_col else ""
        sketch = (lambda: row[sketch_col]) if sketch_col else None
        return Source(f"hf:{self.fingerprint}:{self.rows[i]}", lambda: row[image_col], caption, sketch)


def sketch_hf(split: str, name: str, image_size: int, data_dir: str | None = None, image_column: str = "image",
              caption_column: str | None = "text", conditioning_column: str | None = "conditioning_image",
              hf_split: str = "train", val_split: str | None = None, val_fraction: float = 0.05,
              split_seed: int = 0, **kwargs: Any) -> SketchPairs:
    """Sketch pairs from a Hugging Face dataset.

    Args:
        split: genlab's "train" or "val".
        name: a local `save_to_disk` directory, a hub name or a builder ("imagefolder").
        image_column, caption_column: the target image and its caption (None: empty captions).
        conditioning_column: a ready sketch column, used as it is when the dataset has it;
            otherwise edges are extracted from the image.
        hf_split, val_split: the dataset's splits for train and val (val_split None: hold out
            val_fraction of hf_split, fixed by split_seed).
        kwargs: `SketchPairs` options.
    """
    ds, rows = hf_rows(name, split, data_dir, hf_split, val_split, val_fraction, split_seed)
    check_columns(ds, name, image_column, caption_column)
    sketch_col = conditioning_column if conditioning_column in ds.column_names else None
    sources = _HFSources(ds, rows, image_column, caption_column, sketch_col)
    return SketchPairs(sources, image_size, randomize=split == "train", **kwargs)
