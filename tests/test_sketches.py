"""Sketch pairs: edge extraction, per-index randomness, the disk cache, folder and HF sources."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

from genlab.data import build_dataset
from genlab.data.fill_circles import render_circle
from genlab.data.sketches import canny, edge_params, sketch_folder, sketch_hf, xdog
from genlab.errors import ConfigError

CONFIGS = Path(__file__).parents[1] / "configs" / "data"


def circle_image(size=48, r=12.0, cx=24.0, cy=24.0, fill="red", bg="blue"):
    return render_circle(size, cx, cy, r, fill, bg)[0]


def ring_distance(edges, cx, cy, r):
    ys, xs = np.nonzero(edges > 0.5)
    return np.abs(np.hypot(xs + 0.5 - cx, ys + 0.5 - cy) - r)


def test_canny_and_xdog_trace_the_circle():
    image = circle_image()
    for edges in (canny(image, 100, 200), xdog(image, 0.8, -0.005)):
        assert edges.shape == (48, 48) and edges.min() >= 0 and edges.max() <= 1
        d = ring_distance(edges, 24, 24, 12)
        assert len(d) > 40 and d.max() <= 3.0  # lines on the rim, none elsewhere
    flat = np.full((32, 32, 3), 128, np.uint8)
    assert canny(flat, 100, 200).sum() == 0 and xdog(flat, 0.8, -0.005).max() < 0.01


def test_edge_params_random_per_index_but_reproducible():
    a = [edge_params("canny", True, 0, i) for i in range(20)]
    assert a == [edge_params("canny", True, 0, i) for i in range(20)]
    assert len({p.a for p in a}) == 20 and all(50 <= p.a <= 150 and p.b > p.a for p in a)
    assert edge_params("canny", True, 1, 0) != a[0]
    fixed = edge_params("xdog", False, 0, 5)
    assert (fixed.a, fixed.b) == (0.8, -0.005)
    methods = {edge_params("random", True, 0, i).method for i in range(20)}
    assert methods == {"canny", "xdog"}
    with pytest.raises(ConfigError, match="edges"):
        edge_params("sobel", False, 0, 0)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        sub = root / "sub" if i % 2 else root
        Image.fromarray(circle_image(r=8 + i, fill="red" if i < 3 else "green")).save(sub / f"im{i}.png")
    (root / "im0.txt").write_text("a sidecar caption\n")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "im2.png", "text": "from metadata"}) + "\n")
    return root


def test_folder_pairs_captions_split_and_cache(folder, tmp_path):
    cache = tmp_path / "cache"
    kw = dict(image_size=32, caption="default", val_fraction=0.34, edges="canny", cache_dir=str(cache))
    train, val = sketch_folder("train", str(folder), **kw), sketch_folder("val", str(folder), **kw)
    assert len(train) == 4 and len(val) == 2
    keys = {s.key for s in train.sources} | {s.key for s in val.sources}
    assert len(keys) == 6  # a partition: nothing in both splits
    captions = {Path(s.key.split(":")[0]).name: s.caption for s in train.sources + val.sources}
    assert captions["im0.png"] == "a sidecar caption" and captions["im2.png"] == "from metadata"
    assert captions["im1.png"] == "default"

    batch = default_collate([train[i] for i in range(len(train))])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["sketch"].shape == (4, 3, 32, 32)
    assert batch["image"].min() >= -1 and batch["sketch"].max() == 1 and len(batch["caption"]) == 4
    assert batch["image"].dtype == batch["sketch"].dtype == torch.float32
    assert len(list(cache.rglob("*.png"))) == 4

    # A cache hit returns the same sketch; a poisoned cache file proves it is read.
    again = train[0]["sketch"]
    assert torch.equal(again, batch["sketch"][0])
    for f in cache.rglob("*.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(f)
    assert train[0]["sketch"].sum() == 0
    # Touching the source file changes its key: the sketch is extracted again.
    src = Path(train.sources[0].key.split(":")[0])
    src.write_bytes(src.read_bytes())
    fresh = sketch_folder("train", str(folder), **kw)
    assert torch.equal(fresh[0]["sketch"], batch["sketch"][0])


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        sketch_folder("train", str(tmp_path / "nope"), image_size=32)
    with pytest.raises(ConfigError, match="no images"):
        sketch_folder("train", str(tmp_path), image_size=32)


def test_hf_fill50k_layout_used_as_is(tmp_path):
    import datasets

    images, sketches, texts = [], [], []
    for i in range(5):
        image, sketch = render_circle(40, 20, 20, 6 + i, "yellow", "black")
        images.append(Image.fromarray(image))
        sketches.append(Image.fromarray(sketch))
        texts.append(f"circle {i}")
    path = tmp_path / "fill"
    datasets.Dataset.from_dict({"image": images, "conditioning_image": sketches, "text": texts}).cast_column(
        "image", datasets.Image()).cast_column("conditioning_image", datasets.Image()).save_to_disk(str(path))

    cfg = OmegaConf.load(CONFIGS / "sketch_hf.yaml")
    cfg.name, cfg.image_size, cfg.val_fraction, cfg.cache = str(path), 40, 0.0, False
    ds = build_dataset(cfg, split="train")
    assert len(ds) == 5 and [ds[i]["caption"] for i in range(5)] == texts
    for i in range(5):  # the conditioning image itself, not edges of the target
        expect = torch.from_numpy(np.asarray(sketches[i])[..., 0] / 255.0).float()
        assert torch.allclose(ds[i]["sketch"][0], expect, atol=1e-6)


def test_hf_without_sketch_column_extracts_edges(tmp_path):
    import datasets

    images = [Image.fromarray(circle_image(r=10 + i)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["x"] * 4}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "plain"))
    pairs = sketch_hf("val", str(tmp_path / "plain"), image_size=48, val_fraction=0.5, edges="canny", cache=False)
    assert len(pairs) == 2
    item = pairs[0]
    row = pairs.sources.rows[0]
    assert ring_distance(item["sketch"][0].numpy(), 24, 24, 10 + row).max() <= 2.5
    with pytest.raises(ConfigError, match="column 'caption'"):
        sketch_hf("train", str(tmp_path / "plain"), image_size=48, caption_column="caption")


def test_edges_of_image_for_sample_edges_from():
    from genlab.data.sketches import edges_of_image

    image = torch.from_numpy(circle_image()).permute(2, 0, 1).float() / 255  # what `genlab sample` loads
    sketch = edges_of_image(image)
    assert sketch.shape == (3, 48, 48) and torch.equal(sketch[0], sketch[2])
    assert ring_distance(sketch[0].numpy(), 24, 24, 12).max() <= 2.5 and sketch.sum() > 0
