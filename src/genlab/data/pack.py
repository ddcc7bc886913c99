"""`genlab data pack SRC OUT`: write webdataset shards (data/shards.py) from an image folder
or a Hugging Face dataset, with captions and sketches where they exist.

Image bytes are copied as they are (no decoding, no re-encoding): packing a folder costs
little more than reading it. Samples are shuffled (fixed by `seed`) before they are cut
into shards, so that each shard mixes the whole set, and `val_fraction` of them go to the
val shards.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from genlab.data import split_indices
from genlab.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One sample to pack; `read` returns its image bytes and image extension."""

    read: Callable[[], tuple[bytes, str]]
    caption: str | None = None
    sketch: Callable[[], bytes] | None = None
    label: int | None = None


def _file(path: Path) -> Callable[[], tuple[bytes, str]]:
    return lambda: (path.read_bytes(), path.suffix.lower().lstrip(".").replace("jpeg", "jpg"))


def folder_records(root: Path) -> list[Record]:
    """A folder's images with captions (NAME.txt beside, or metadata.jsonl "text") and sketches
    (metadata.jsonl "conditioning_image", a path relative to the metadata file)."""
    from genlab.data.file_list import folder_metadata, list_images

    for listing in root.rglob("metadata.jsonl"):  # its captions are packed too
        _inside(listing, root)
    meta = folder_metadata(root)
    sketches = {str((Path(p).parent / row["conditioning_image"]).resolve())
                for p, row in meta.items() if row.get("conditioning_image")}
    files, _ = list_images(root)
    records = []
    for path in map(Path, files):
        if str(path.resolve()) in sketches:
            continue  # a sketch is packed with its image, not as an image of its own
        row = meta.get(str(path.resolve()), {})
        text = path.with_suffix(".txt")
        sketch = row.get("conditioning_image")
        for part in (path, *([text] if text.exists() else []), *([path.parent / sketch] if sketch else [])):
            _inside(part, root)
        caption = text.read_text().strip() if text.exists() else row.get("text")
        records.append(Record(_file(path), caption, (path.parent / sketch).read_bytes if sketch else None))
    return records


def _inside(path: Path, root: Path) -> None:
    """Shards are published: a file that leads out of SRC (a link, a `../` sketch path) is refused."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"{path} leads outside {root} (to {path.resolve()}), so nothing was packed; "
                          "copy the file into the folder instead.")


def _bytes_of(value: dict) -> tuple[bytes, str]:
    """Bytes and extension of an undecoded `datasets.Image` value ({"bytes", "path"})."""
    data = value.get("bytes") or Path(value["path"]).read_bytes()
    kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    return data, {"jpeg": "jpg", "tiff": "tif"}.get(kind, kind)


def hf_records(name: str, split: str, data_dir: str | None, image_column: str, caption_column: str | None,
               conditioning_column: str | None, label_column: str | None) -> list[Record]:
    """Rows of a Hugging Face dataset; images (and sketches) as their stored bytes."""
    import datasets

    from genlab.data.hf import check_columns, load_hf_split

    ds = load_hf_split(name, split, data_dir)
    check_columns(ds, name, image_column, caption_column, label_column)
    has_sketch = conditioning_column in ds.column_names
    for column in (image_column, conditioning_column if has_sketch else None):
        if column:
            ds = ds.cast_column(column, datasets.Image(decode=False))

    # Text columns are read whole (cheap); image bytes row by row, as each shard is written.
    captions = ds[caption_column] if caption_column else [None] * len(ds)
    labels = ds[label_column] if label_column else [None] * len(ds)

    def record(i: int) -> Record:
        sketch = (lambda: _bytes_of(ds[i][conditioning_column])[0]) if has_sketch else None
        return Record(lambda: _bytes_of(ds[i][image_column]), None if captions[i] is None else str(captions[i]),
                      sketch, None if labels[i] is None else int(labels[i]))

    return [record(i) for i in range(len(ds))]


def _samples(records: list[Record], keys: list[str]) -> Iterator[dict]:
    for i, record in enumerate(records):
        data, ext = record.read()
        if not data:
            log.warning("skipping an empty image (sample %d)", i)
            continue
        sample = {"__key__": f"{i:09d}", ext: data}
        if "caption" in keys:
            sample["txt"] = (record.caption or "").encode("utf-8")
        if "sketch" in keys:
            sample["sketch.png"] = record.sketch()
        if "label" in keys:
            sample["cls"] = str(record.label).encode()
        yield sample


def write_shards(records: list[Record], out: Path, split: str, shard_size: int, keys: list[str],
                 source: str) -> dict:
    """Write `records` as OUT/<split>-NNNNNN.tar shards of `shard_size` samples and OUT/<split>.json."""
    from webdataset import TarWriter

    shards, writer, count = [], None, 0
    for sample in _samples(records, keys):
        if writer is None or count == shard_size:
            if writer is not None:
                writer.close()
                shards[-1]["nsamples"] = count
            shards.append({"url": f"{split}-{len(shards):06d}.tar", "nsamples": 0})
            writer, count = TarWriter(str(out / shards[-1]["url"]), encoder=False), 0
        writer.write(sample)
        count += 1
    if writer is not None:
        writer.close()
        shards[-1]["nsamples"] = count
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split, "shardlist": shards,
             "genlab": {"keys": keys, "source": source}}
    (out / f"{split}.json").write_text(json.dumps(index, indent=1))
    return index


def pack(src: str, out: str | Path, shard_size: int = 1000, val_fraction: float = 0.01, seed: int = 0,
         data_dir: str | None = None, hf_split: str = "train", image_column: str = "image",
         caption_column: str | None = "text", conditioning_column: str | None = "conditioning_image",
         label_column: str | None = None) -> dict[str, int]:
    """Pack SRC (an image folder, or a Hugging Face dataset name / saved dir) into shards in OUT.

    Returns:
        {"train": samples, "val": samples, "train_shards": n, "val_shards": n}.
    """
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: give at least 1 sample per shard.")
    out = Path(out).expanduser()
    if out.exists() and any(out.glob("*.json")):
        raise ConfigError(f"{out} already holds a shard index; pack into a new folder.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} is not an empty folder, so nothing was packed; pack into a new (or empty) folder.")
    root = Path(src).expanduser()
    is_folder = root.is_dir() and not any((root / f).exists() for f in ("dataset_dict.json", "state.json"))
    records = (folder_records(root) if is_folder else
               hf_records(src, hf_split, data_dir, image_column, caption_column, conditioning_column, label_column))
    if not records:
        raise ConfigError(f"no images found in {src}; give an image folder or a Hugging Face dataset.")
    keys = ["image"]
    keys += ["caption"] if any(r.caption for r in records) else []
    keys += ["sketch"] if all(r.sketch for r in records) else []
    keys += ["label"] if all(r.label is not None for r in records) else []
    order = np.random.default_rng(seed).permutation(len(records))  # each shard mixes the whole set
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split in ("train", "val"):
        chosen = [records[order[i]] for i in split_indices(len(records), split, val_fraction, seed)]
        index = write_shards(chosen, out, split, shard_size, keys, str(src))
        summary[split] = sum(s["nsamples"] for s in index["shardlist"])
        summary[f"{split}_shards"] = len(index["shardlist"])
    return summary
