"""What a family declares (families/contract.py: name, card, losses, metrics) is what runs, cards and the
best-checkpoint tracker use: nothing is guessed from `_target_` paths or name fragments, and a family
written outside genlab gets its own card and table row without an edit to genlab."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from minimal_family import ClassTemplates

from conftest import assert_same_png_pixels, cli
from genlab.families.contract import Card
from genlab.families.declarations import declared
from genlab.model_card import family_class, write_model_card
from genlab.run_dir import RunDir
from genlab.families.logged import direction
from genlab.train.best import BestTracker

ROOT = Path(__file__).resolve().parents[1]
TARGETS = sorted({yaml.safe_load(p.read_text())["_target_"] for p in (ROOT / "configs" / "model").glob("*.yaml")})


@pytest.mark.parametrize("target", TARGETS)
def test_every_family_declares_what_readers_need(target):
    family = family_class({"model": {"_target_": target}})
    assert family is not None, target
    assert isinstance(family.name, str) and family.name and isinstance(family.card, Card) and family.card.what
    assert isinstance(family.losses, tuple) and family.losses and all(isinstance(k, str) for k in family.losses)
    assert all(v in ("lower", "higher") for v in dict(family.metrics).values())
    # `genlab runs` reads them from the source, without importing the family: both readings agree.
    assert declared(target) == {"name": family.name, "losses": family.losses, "metrics": dict(family.metrics)}


def outside_run(tiny_ddpm_run, tmp_path) -> RunDir:
    """A copy of the tiny DDPM run whose config names the family of tests/minimal_family.py."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_ddpm_run, copy, ignore=shutil.ignore_patterns(".lock"))
    config = yaml.safe_load((copy / ".hydra" / "config.yaml").read_text())
    config["model"] = {"_target_": "minimal_family.ClassTemplates", "image_size": 8, "channels": 1, "num_classes": 10}
    (copy / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    with open(copy / "metrics.jsonl", "a") as f:  # a logged scalar that is no declared loss, though named like one
        f.write(json.dumps({"step": 5, "loss": 0.5, "aux_loss_weight": 2.0}) + "\n")
    return RunDir(copy)


def test_a_family_from_outside_gets_its_own_card(tiny_ddpm_run, tmp_path, monkeypatch):
    run = outside_run(tiny_ddpm_run, tmp_path)
    text = write_model_card(run, family=ClassTemplates).read_text()  # as the loop passes the family it trained
    assert "# Class templates on digits" in text and "This is a learned image per class" in text
    assert f'load_file("{run.export.resolve()}/templates.safetensors")' in text
    assert "- last logged: loss=0.5 at step 5" in text  # its declared losses, not every key with "loss" in it
    header = yaml.safe_load(text.split("---")[1])
    assert header["tags"] == ["genlab", "templates", "safetensors"] and "pipeline_tag" not in header

    assert "templates" not in write_model_card(run).read_text().split("---")[1]  # untrusted: its module is not imported
    monkeypatch.setenv("GENLAB_ALLOW_TARGETS", "minimal_family")  # trusted: read from the config alone
    assert write_model_card(run).read_text() == text


def test_runs_shows_the_declared_name_and_losses(tiny_ddpm_run, tmp_path):
    from genlab.runs import run_info

    info = run_info(outside_run(tiny_ddpm_run, tmp_path))
    assert info["family"] == "templates"  # not the copied run's `model=` choice (ddpm)
    assert info["losses"] == {"loss": 0.5} and info["loss_keys"] == ("loss",)


def test_directions_are_declared_not_guessed_from_fragments():
    assert direction("class_confidence_digits_cnn") == "higher"  # "con-fid-ence" once read as an FID
    assert direction("border_artifacts") == "lower" and direction("fid_digits_cnn@trunc0.5") == "lower"
    assert direction("recall_digits_mlp") == "higher" and direction("best_kid_inception") == "lower"
    assert direction("loss", ClassTemplates.metrics, ClassTemplates.losses) == "lower"
    tracker = BestTracker("ms_ratio", declared={"ms_ratio": "lower"})  # a family's own metric, lower is better
    assert tracker.update(1, {"ms_ratio": 2.0}) and tracker.update(2, {"ms_ratio": 1.0})
    assert not tracker.update(3, {"ms_ratio": 1.5})


def test_reconstruct_pairs_each_image_with_its_own_label(tmp_path):
    """`genlab sample --reconstruct` on a conditional VAE: each val image is encoded and decoded with its label."""
    from genlab.data import build_dataset
    from genlab.run_dir import load_family
    from genlab.sample import sample_command
    from genlab.train.sampling import save_grid

    run = tmp_path / "cvae"
    cli("train", "model=vae", "trainer=debug", "logger=none", "data.image_size=8", "model.block_out_channels=[8,16]",
        "model.norm_num_groups=4", "model.conditional=true", f"hydra.run.dir={run}")
    out = sample_command(run, n=8, seed=0, out=tmp_path / "recon.png", checkpoint="latest", use_ema=True,
                         separate=False, sketch=None, edges_from=None, options={"reconstruct": True})

    family, cfg = load_family(RunDir(run))
    val = build_dataset(cfg.data, "val")
    items = [val[i] for i in range(8)]
    images, labels = torch.stack([item["image"] for item in items]), torch.tensor([int(item["label"]) for item in items])
    assert not torch.equal(labels, torch.arange(8) % 10)  # else the cycling labels would pass too
    own = save_grid(family.sample(8, seed=0, reconstruct=True, images=images, labels=labels), tmp_path / "own.png")
    assert_same_png_pixels(out, own)
    cycling = save_grid(family.sample(8, seed=0, reconstruct=True, images=images), tmp_path / "cycling.png")
    with pytest.raises(AssertionError):  # the labels matter: the bug would show
        assert_same_png_pixels(out, cycling)
