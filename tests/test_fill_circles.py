"""fill_circles: shapes, ranges, determinism, ground truth that matches the pixels."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from genlab.data import build_dataset
from genlab.data.fill_circles import COLOUR_NAMES, PALETTE, FillCircles, disc_mask
from genlab.errors import ConfigError

CONFIG = Path(__file__).parents[1] / "configs" / "data" / "fill_circles.yaml"


def test_item_shapes_ranges_and_caption():
    ds = FillCircles("train", image_size=32, count=10)
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["sketch"].shape == (3, 32, 32)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert set(item["sketch"].unique().tolist()) <= {0.0, 1.0}
    fill, bg = COLOUR_NAMES[item["fill"]], COLOUR_NAMES[item["background"]]
    assert fill != bg
    assert item["caption"] == f"a {fill} circle on a {bg} background"
    assert len(ds) == 10 and len(FillCircles("val", val_count=7)) == 7


def test_ground_truth_matches_pixels():
    ds = FillCircles("train", image_size=48, count=20, seed=3)
    for i in range(20):
        item = ds[i]
        cx, cy, r = item["circle"].tolist()
        assert r <= cx <= 48 - r and r <= cy <= 48 - r  # the disc lies inside the image
        fill = torch.tensor(PALETTE[COLOUR_NAMES[item["fill"]]]) / 127.5 - 1
        is_fill = (item["image"] - fill[:, None, None]).abs().amax(0) < 1e-5
        assert torch.equal(is_fill, disc_mask(48, item["circle"]))
        # The sketch's outline surrounds the disc: its pixels sit about r from the centre.
        ys, xs = torch.nonzero(item["sketch"][0] > 0.5, as_tuple=True)
        dist = torch.hypot(xs + 0.5 - cx, ys + 0.5 - cy)
        assert (dist - r).abs().max() <= 1.0
        assert len(xs) > 3 * r  # a closed outline, not a few dots


def test_deterministic_per_index_and_split():
    a, b = FillCircles("train", count=50, seed=1), FillCircles("train", count=50, seed=1)
    assert torch.equal(a[17]["image"], b[17]["image"]) and a[17]["caption"] == b[17]["caption"]
    val = FillCircles("val", count=50, val_count=50, seed=1)
    other = FillCircles("train", count=50, seed=2)
    circles = lambda ds: torch.stack([ds[i]["circle"] for i in range(50)])  # noqa: E731
    assert not torch.allclose(circles(a), circles(val))
    assert not torch.allclose(circles(a), circles(other))
    # Items vary: radii spread over the configured range, several colours appear.
    radii = circles(a)[:, 2] / 32
    assert radii.min() >= 0.12 and radii.max() <= 0.35 and radii.std() > 0.03
    assert len({a[i]["caption"] for i in range(50)}) > 20


def test_config_instantiates_and_collates():
    cfg = OmegaConf.load(CONFIG)
    ds = build_dataset(cfg, split="val")
    batch = default_collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, cfg.image_size, cfg.image_size)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert batch["circle"].shape == (4, 3)


def test_bad_arguments_say_what_to_fix():
    with pytest.raises(ConfigError, match="channels"):
        FillCircles(channels=1)
    with pytest.raises(ConfigError, match="radius_range"):
        FillCircles(radius_range=(0.3, 0.6))
    with pytest.raises(IndexError):
        FillCircles(count=3)[3]


def test_metrics_read_the_ground_truth_back():
    """What genlab eval reads from a generated image finds the item's own disc and fill colour."""
    from genlab.data.fill_circles import PALETTE
    from genlab.eval.control_metrics import disc_colour_name, disc_iou

    ds = FillCircles("val", image_size=32, val_count=10)
    names = list(PALETTE)
    for i in range(10):
        item = ds[i]
        assert disc_colour_name(item["image"], PALETTE) == names[item["fill"].item()]
        assert disc_iou(item["image"], item["circle"]) == 1.0
        shifted = torch.roll(item["image"], shifts=int(item["circle"][2]), dims=2)  # the disc moved by r
        assert 0.2 < disc_iou(shifted, item["circle"]) < 0.8
