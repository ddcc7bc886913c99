"""Aspect-ratio buckets: one shape per batch, the sketch with its image, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.data.batches import BatchStream, make_order
from genlab.data.buckets import BucketOrder, bucket_sizes, nearest_bucket
from genlab.data.sketches import canny, sketch_folder

SHAPES = [(48, 24), (24, 48), (32, 32)]  # (width, height): wide, tall, square


def test_bucket_sizes_keep_the_area_and_the_ratio_range():
    sizes = bucket_sizes(64, step=16, max_ratio=2.0)
    assert (64, 64) in sizes and (80, 48) in sizes and (48, 80) in sizes
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 and 0.5 <= w / h <= 2 for w, h in sizes)
    assert sizes[nearest_bucket(1000, 1000, sizes)] == (64, 64)
    assert sizes[nearest_bucket(300, 160, sizes)] == (80, 48)  # 1.875 is nearest 1.67 among the wide ones
    with pytest.raises(Exception, match="step=24 must divide"):
        bucket_sizes(64, step=24)


@pytest.fixture
def mixed_folder(tmp_path):
    """24 photos of circles in three shapes, 8 of each."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(24):
        w, h = SHAPES[i % 3]
        ys, xs = np.mgrid[0:h, 0:w]
        disc = np.hypot(xs - w / 2, ys - h / 2) < min(w, h) / 3 + i % 4
        pixels = np.where(disc[..., None], [200, 40, 40], [30, 60, 200]).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def _pairs(folder, tmp_path):
    return sketch_folder("train", str(folder), image_size=32, val_fraction=0.0, edges="canny", canny_low=[100, 100],
                         canny_high=[200, 200], cache_dir=str(tmp_path / "sketches"), buckets={"step": 8, "max_ratio": 2.0})


def test_a_bucketed_batch_never_mixes_shapes_and_keeps_each_sketch_with_its_image(mixed_folder, tmp_path):
    pairs = _pairs(mixed_folder, tmp_path)
    order = make_order(pairs, batch_size=4, seed=0)
    assert isinstance(order, BucketOrder) and order.batches_per_epoch == 6  # 3 buckets x 8 // 4
    stream = BatchStream(pairs, order, num_workers=0)
    shapes = set()
    for _ in range(12):  # two epochs
        batch = next(stream)
        images, sketches = batch["image"], batch["sketch"]
        assert images.shape[0] == 4 and sketches.shape[-2:] == images.shape[-2:]
        shapes.add(tuple(images.shape[-2:]))
        for image, sketch in zip(images, sketches):  # the sketch is drawn from its image, at the bucket's size
            pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            assert torch.equal(sketch[0], torch.from_numpy(canny(pixels, 100, 100 + 1)))
    assert shapes == {(24, 40), (40, 24), (32, 32)}  # (H, W) of the three buckets nearest the three shapes


def test_bucket_order_resumes_exactly_and_reshuffles(mixed_folder, tmp_path):
    pairs = _pairs(mixed_folder, tmp_path)
    order = make_order(pairs, batch_size=2, seed=3)  # 12 batches per epoch
    straight = [next(s)["image"] for s in [BatchStream(pairs, order, num_workers=2)] for _ in range(16)]
    first = BatchStream(pairs, order, num_workers=0)
    for _ in range(7):
        next(first)
    resumed = BatchStream(pairs, order, num_workers=2, **first.position)
    assert all(torch.equal(a, next(resumed)["image"]) for a in straight[7:])
    epochs = [order.epoch_batches(e) for e in (0, 1)]
    assert sorted(torch.cat(epochs[0]).tolist()) == list(range(24))  # every image once per epoch
    assert [b.tolist() for b in epochs[0]] != [b.tolist() for b in epochs[1]]
    ranks = [BucketOrder(pairs.bucket_of, 2, 3, rank=r, world_size=2).epoch_batches(0) for r in (0, 1)]
    for a, b in zip(*ranks):  # the two halves of one global batch share its bucket
        assert len({pairs.bucket_of[i] for i in a.tolist() + b.tolist()}) == 1
