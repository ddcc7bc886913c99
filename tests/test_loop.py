"""The generic loop's arithmetic: accumulation, LR schedules, resume, non-finite losses."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import toy_config
from genlab.train.job import run_training
from genlab.train.loop import NonFiniteError


def _weights(run_dir):
    latest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(latest / "net.safetensors")


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grad_accum_2x8_equals_1x16(tmp_path):
    """Two micro-batches of 8 must give the same update as one batch of 16 (same images)."""
    run_training(toy_config("trainer.batch_size=16", "trainer.grad_accum=1", "trainer.max_steps=3"), tmp_path / "a")
    run_training(toy_config("trainer.batch_size=8", "trainer.grad_accum=2", "trainer.max_steps=3"), tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    # and it is a real update: different from a run of 2 steps
    run_training(toy_config("trainer.batch_size=16", "trainer.max_steps=2"), tmp_path / "c")
    assert not torch.allclose(a["weight"], _weights(tmp_path / "c")["weight"])


@pytest.mark.parametrize("schedule,expected", [
    ("cosine", lambda s, T, w: (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (T - w)))),
    ("linear", lambda s, T, w: (s + 1) / w if s < w else 1 - (s - w) / (T - w)),
    ("step", lambda s, T, w: (s + 1) / w if s < w else 0.1 ** ((s >= 4) + (s >= 7))),
])
def test_lr_schedule_counts_optimizer_steps(tmp_path, schedule, expected):
    """With grad_accum=3 the LR after optimizer step s is schedule(s), not schedule(3s)."""
    T, warmup = 10, 2
    cfg = toy_config(f"lr_schedule={schedule}", "trainer.grad_accum=3", f"trainer.max_steps={T}",
                     f"lr_schedule.warmup_steps={warmup}", "trainer.lr=0.01",
                     *(["lr_schedule.milestones=[4,7]"] if schedule == "step" else []))
    run_training(cfg, tmp_path)
    for row in _metrics(tmp_path):
        # metrics.jsonl logs the LR in effect after `step` optimizer steps: schedule(step)
        assert row["lr_net"] == pytest.approx(0.01 * expected(row["step"], T, warmup), abs=1e-9), row


def test_resume_is_bitwise_identical(tmp_path):
    """4 steps straight == 2 steps, stop, resume to 4: same losses and weights (noise RNG included)."""
    from genlab.train.loop import Trainer

    straight = tmp_path / "straight"
    run_training(toy_config("trainer.max_steps=4", noise=True), straight)
    stopped = tmp_path / "stopped"
    run_training(toy_config("trainer.max_steps=2", noise=True), stopped)
    run_training(toy_config("trainer.max_steps=4", noise=True), stopped, resume=True)
    assert [r["loss"] for r in _metrics(straight)] == [r["loss"] for r in _metrics(stopped)]
    a, b = _weights(straight), _weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_loss_stops_before_the_step(tmp_path):
    cfg = toy_config("trainer.max_steps=4", "trainer.lr=1e30", "optimizer=sgd", "trainer.checkpoint_every=1")
    with pytest.raises(NonFiniteError, match="non-finite loss in phase 'net' at step"):
        run_training(cfg, tmp_path)
    for w in _weights(tmp_path).values():  # the last checkpoint is loadable and finite
        assert torch.isfinite(w).all()
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


def test_nonfinite_skip_gives_up_after_k(tmp_path):
    cfg = toy_config("trainer.max_steps=50", "trainer.lr=1e30", "optimizer=sgd", "trainer.on_nonfinite=skip",
                     "trainer.max_nonfinite_skips=3")
    with pytest.raises(NonFiniteError):
        run_training(cfg, tmp_path)
    log = (tmp_path / "status.json").read_text()
    assert "non-finite" in log
