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


def test_imagefolder_is_recursive_and_skips_bad_files(tmp_path, caplog):
    _write_images(tmp_path, 20)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        train = ImageFolder(str(tmp_path), "train", image_size=8, val_fraction=0.1, max_bad_fraction=0.2)
    val = ImageFolder(str(tmp_path), "val", image_size=8, val_fraction=0.1, max_bad_fraction=0.2)
    assert len(train) + len(val) == 20 and len(val) == 2
    assert "empty.png" in caplog.text and "text.jpg" in caplog.text
    assert "come in 3 modes (L: 7, RGB: 7, RGBA: 6); each is converted to RGB" in caplog.text
    item = train[0]["image"]
    assert item.shape == (3, 8, 8) and item.min() >= -1 and item.max() <= 1
    with pytest.raises(GenlabError, match="2 of 22 images .* cannot be read"):
        ImageFolder(str(tmp_path), "train", image_size=8, max_bad_fraction=0.05)


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
