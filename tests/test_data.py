"""Datasets and the resumable batch stream."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.data.batches import BatchOrder, BatchStream
from genlab.data.digits import Digits
from genlab.data.imagefolder import ImageFolder
from genlab.errors import GenlabError


def test_digits_shapes_range_split_and_labels():
    train, val = Digits("train", image_size=16), Digits("val", image_size=16)
    assert len(train) + len(val) == 1797 and abs(len(val) - 180) <= 1
    assert train.images.shape[1:] == (1, 16, 16)
    assert train.images.min() >= -1 and train.images.max() <= 1 and train.images.max() > 0.9
    assert set(train.labels.tolist()) == set(range(10))
    assert Digits("train", channels=3).images.shape[1] == 3
    excluded = Digits("train", exclude_classes=[3])
    assert 3 not in excluded.labels.tolist() and 3 in Digits("val", exclude_classes=[3]).labels.tolist()


def _write_images(folder, n, size=12):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"sub{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        mode = ["RGB", "L", "RGBA"][i % 3]  # mixed modes are converted, not refused
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).convert(mode).save(sub / f"{i}.png")


def test_imagefolder_starts_without_decoding_and_reports_a_corrupt_file_when_reached(tmp_path, caplog, monkeypatch):
    """300 images and a corrupt one: nothing is decoded at start-up; the corrupt file is reported
    when training reaches it, replaced by the next file, and left out of the next start."""
    from PIL import Image as PILImage

    from genlab.data import file_list, imagefolder

    folder, cache = tmp_path / "images", tmp_path / "cache"
    _write_images(folder, 300, size=6)
    (folder / "sub0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    opened = []
    real_open = PILImage.open
    monkeypatch.setattr(imagefolder.Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    with caplog.at_level(logging.WARNING):
        train = ImageFolder(str(folder), "train", image_size=4, val_fraction=0.0, cache_dir=str(cache))
    assert len(train) == 301 and len(opened) <= imagefolder.MODE_PROBES  # headers of a few files, no decoding
    assert "corrupt.png" not in caplog.text and "several modes" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        items = [train[i]["image"] for i in range(len(train))]
    assert caplog.text.count("skipping image") == 1 and "corrupt.png that failed to decode" in caplog.text
    assert all(x.shape == (3, 4, 4) and x.min() >= -1 and x.max() <= 1 for x in items)

    # The next start reads the cached list (no walk) and leaves the known-bad file out, saying so.
    monkeypatch.setattr(file_list, "_walk", lambda root: pytest.fail("walked a folder that did not change"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = ImageFolder(str(folder), "train", image_size=4, val_fraction=0.0, cache_dir=str(cache))
    assert len(again) == 300 and "leaving out 1 image" in caplog.text and "corrupt.png" in caplog.text
    with pytest.raises(GenlabError, match="1 of 301 images .* cannot be read"):
        ImageFolder(str(folder), "train", image_size=4, max_bad_fraction=0.0, cache_dir=str(cache))


def test_imagefolder_file_list_follows_changes_to_the_folder(tmp_path):
    folder, cache = tmp_path / "images", tmp_path / "cache"
    _write_images(folder, 10)
    assert len(ImageFolder(str(folder), "train", val_fraction=0.0, cache_dir=str(cache))) == 10
    _write_images(folder / "sub1" / "deeper", 3)  # a new sub-folder: its parent's time changes
    assert len(ImageFolder(str(folder), "train", val_fraction=0.0, cache_dir=str(cache))) == 13
    next((folder / "sub0").glob("*.png")).unlink()
    assert len(ImageFolder(str(folder), "train", val_fraction=0.0, cache_dir=str(cache))) == 12


def test_split_indices_is_a_fixed_partition_and_can_stratify():
    from genlab.data import split_indices

    train, val = split_indices(100, "train", 0.1, 3), split_indices(100, "val", 0.1, 3)
    assert len(val) == 10 and sorted(train + val) == list(range(100)) and train == split_indices(100, "train", 0.1, 3)
    assert val != split_indices(100, "val", 0.1, 4)
    labels = [i % 2 for i in range(100)]
    strat = split_indices(100, "val", 0.2, 0, stratify=labels)
    assert sum(labels[i] for i in strat) == 10 and len(strat) == 20  # each class in proportion
    assert split_indices(1, "val", 0.5, 0) == [] and split_indices(2, "val", 0.0, 0) == []


def test_imagefolder_clear_errors(tmp_path):
    with pytest.raises(GenlabError, match="is not a folder"):
        ImageFolder(str(tmp_path / "nope"))
    with pytest.raises(GenlabError, match="no images"):
        ImageFolder(str(tmp_path))


def test_hf_dataset_with_the_imagefolder_builder(tmp_path):
    from genlab.data.hf import HFImages

    _write_images(tmp_path / "imgs", 10)
    ds = HFImages("imagefolder", "train", data_dir=str(tmp_path / "imgs"), image_size=8, val_fraction=0.2)
    assert len(ds) == 8 and ds[0]["image"].shape == (3, 8, 8)
    with pytest.raises(GenlabError, match="column 'img'"):
        HFImages("imagefolder", "train", data_dir=str(tmp_path / "imgs"), image_column="img")


def _drain(stream, n):
    return [next(stream)["image"].clone() for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_stream_resumes_exactly_mid_epoch(tmp_path, num_workers):
    """Batches after a restore equal the straight run's, random flips included."""
    _write_images(tmp_path, 24)
    ds = ImageFolder(str(tmp_path), "train", image_size=8, val_fraction=0.01, random_flip=True)
    order = BatchOrder(len(ds), batch_size=4, seed=3)  # 5 batches per epoch
    straight = _drain(BatchStream(ds, order, num_workers=num_workers), 8)
    first = BatchStream(ds, order, num_workers=num_workers)
    _drain(first, 3)
    resumed = BatchStream(ds, order, num_workers=num_workers, **first.position)
    rest = _drain(resumed, 5)  # crosses the epoch boundary
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], rest))
    assert not torch.equal(straight[0], straight[5])  # epochs are reshuffled


def test_batch_order_shards_global_batches_across_processes():
    orders = [BatchOrder(100, 4, seed=0, rank=r, world_size=2) for r in (0, 1)]
    single = BatchOrder(100, 8, seed=0)
    perm = single.epoch_permutation(0)
    both = torch.cat([orders[0].batch(perm, 1), orders[1].batch(perm, 1)])
    assert torch.equal(both, single.batch(perm, 1))  # 2 processes x 4 == 1 process x 8
