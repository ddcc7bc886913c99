"""Trackers (logger=tensorboard, several at once) and the progress line."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from conftest import TINY_DDPM, cli, genlab
from PIL import Image

from genlab.train.tracking import Progress, chosen_trackers

TINY = [a for a in TINY_DDPM if not a.startswith("logger=")]


def _tensorboard_events(folder):
    """TensorBoard's own reader over every event file of `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import (
        IMAGES,
        SCALARS,
        EventAccumulator,
    )

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0, IMAGES: 0})
    events.Reload()
    return events


@pytest.mark.slow  # a training subprocess with W&B and TensorBoard (~18 s); `make test-slow` (CI) runs it
def test_wandb_and_tensorboard_together_get_scalars_and_images(tmp_path):
    run = tmp_path / "run"
    genlab("train", *TINY, "logger=[wandb,tensorboard]", f"hydra.run.dir={run}", env={"WANDB_MODE": "offline"})
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    events = _tensorboard_events(run / "tensorboard")
    tags = events.Tags()
    assert {"loss", "images_per_s", "lr_unet"} <= set(tags["scalars"])
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == [(r["step"], r["loss"]) for r in logged]
    images = events.Images("samples")
    assert [e.step for e in images] == [2, 4, 4]  # step_000002, step_000004, then final (also at step 4)
    shown = np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB"))
    drawn = np.asarray(Image.open(run / "samples" / "step_000002.png").convert("RGB"))
    assert shown.shape == drawn.shape and (shown == drawn).all()

    # W&B (offline) ran beside it: its run folder holds the same sample grids.
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("files/media/images/samples_*.png"))


@pytest.mark.slow  # two more training processes; the resume rule itself is the W&B one (test_reliability)
def test_tensorboard_resume_logs_each_step_once(tmp_path):
    """Killed after logging step 3 with the newest complete checkpoint at 2: the resumed attempt sends only step 4."""
    run = tmp_path / "run"
    genlab("train", *TINY, "logger=tensorboard", "trainer.max_steps=3", "trainer.sample_every=0", f"hydra.run.dir={run}")
    (run / "checkpoints" / "step_000003" / "COMPLETE").unlink()  # as if killed while saving step 3
    genlab("resume", str(run), "trainer.max_steps=4")
    events = _tensorboard_events(run / "tensorboard")  # both attempts' event files, read as one run
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_logger_choices():
    wandb = {"enabled": True, "mode": "auto", "project": "p"}
    assert chosen_trackers({"wandb": wandb, "tensorboard": {"enabled": True}}).keys() == {"wandb", "tensorboard"}
    assert chosen_trackers({}) == {}
    assert chosen_trackers({"wandb": {"group": "sweep"}}) == {}  # a sweep's group alone turns nothing on
    assert chosen_trackers({"name": "wandb", "project": "p"}) == {"wandb": {"name": "wandb", "project": "p"}}
    assert chosen_trackers({"name": "none"}) == {}  # a run saved before several trackers


def test_logger_lists_are_checked_one_choice_at_a_time(tmp_path, monkeypatch):
    from genlab.config import validate_overrides

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GENLAB_RUNS", str(tmp_path))
    assert set(validate_overrides(["logger=[wandb,tensorboard]"]).logger) == {"wandb", "tensorboard"}
    result = cli("train", "logger=[wandb,tensorbord]", check=False)
    assert result.returncode == 2 and "unknown choice 'tensorbord'" in result.stderr
    assert "did you mean 'tensorboard'" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was created


def test_plain_progress_lines_show_step_loss_rate_and_eta(caplog, monkeypatch):
    clock = iter([100.0, 110.0])  # start, then 10 s later at step 20 of 100
    monkeypatch.setattr("genlab.train.tracking.time.perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="genlab.train.tracking")
    progress = Progress(total=100, start=0, mode="plain")
    progress.update(20, {"loss": 0.12345, "lr_main": 1e-3, "images_per_s": 256.4})
    assert caplog.messages == ["step 20/100  loss=0.1235  img/s=256  eta 0:00:40"]


def test_rich_progress_bar_shows_step_loss_rate_and_eta():
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    progress = Progress(total=100, start=0, mode="rich", console=console)
    progress.update(20, {"loss": 0.5, "images_per_s": 300.0})
    progress.close()
    shown = console.file.getvalue()
    assert "20/100" in shown and "loss=0.5" in shown and "img/s=300" in shown and "ETA" in shown
