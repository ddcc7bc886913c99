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
    """Two micro-batches of 8 give the gradient of one batch of 16 (the mean, not the sum).

    Plain SGD (no momentum, no clipping): the update is -lr x gradient, so a scaled gradient
    shows in the weights, unlike Adam's scale-free update.
    """
    sgd = ["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false", "trainer.lr=0.05", "trainer.log_every=1"]
    run_training(toy_config(*sgd, "trainer.batch_size=16", "trainer.grad_accum=1", "trainer.max_steps=3"), tmp_path / "a")
    run_training(toy_config(*sgd, "trainer.batch_size=8", "trainer.grad_accum=2", "trainer.max_steps=3"), tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    norms = [(x["grad_norm_net"], y["grad_norm_net"]) for x, y in zip(_metrics(tmp_path / "a"), _metrics(tmp_path / "b"))]
    assert all(x == pytest.approx(y, rel=1e-5) for x, y in norms)  # the accumulated gradient itself
    # and it is a real update: different from a run of 2 steps
    run_training(toy_config(*sgd, "trainer.batch_size=16", "trainer.max_steps=2"), tmp_path / "c")
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

    straight = tmp_path / "straight"
    run_training(toy_config("trainer.max_steps=4", noise=True), straight)
    stopped = tmp_path / "stopped"
    run_training(toy_config("trainer.max_steps=2", noise=True), stopped)
    run_training(toy_config("trainer.max_steps=4", noise=True), stopped, resume=True)
    assert [r["loss"] for r in _metrics(straight)] == [r["loss"] for r in _metrics(stopped)]
    a, b = _weights(straight), _weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _trainer(cfg, run_dir):
    from genlab.run_dir import RunDir
    from genlab.train.loop import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, RunDir(run_dir))


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_nonfinite_stops_before_the_optimizer_touches_a_weight(tmp_path, bad):
    """A NaN loss, or a finite loss with an inf gradient, at the 3rd step: the weights stay those of step 2."""
    cfg = toy_config("trainer.max_steps=4", "trainer.checkpoint_every=1", "optimizer=sgd", "optimizer.nesterov=false",
                     "trainer.lr=0.1")
    cfg.model = {"_target_": "toy_family.BadAt", "image_size": 8, "channels": 1, "calls": [3], "bad": bad}
    trainer = _trainer(cfg, tmp_path)
    with pytest.raises(NonFiniteError, match=f"non-finite {'loss' if bad == 'loss' else 'gradients'} in phase 'net' at step 3"):
        trainer.fit()
    after_step_2 = load_file(tmp_path / "checkpoints" / "step_000002" / "net.safetensors")
    assert torch.equal(trainer.family.net.weight.detach(), after_step_2["weight"])
    assert torch.isfinite(trainer.family.net.weight).all()


def test_nonfinite_skip_skips_and_goes_on(tmp_path):
    """on_nonfinite=skip: bad micro-batches are dropped, the step is redone on the next batch."""
    cfg = toy_config("trainer.max_steps=4", "trainer.on_nonfinite=skip", "trainer.max_nonfinite_skips=2",
                     "trainer.log_every=1")
    cfg.model = {"_target_": "toy_family.BadAt", "image_size": 8, "channels": 1, "calls": [2, 3, 5], "bad": "loss"}
    run_training(cfg, tmp_path)
    assert [row["step"] for row in _metrics(tmp_path)] == [1, 2, 3, 4]  # 7 loss calls, 3 of them skipped
    assert all(math.isfinite(row["loss"]) for row in _metrics(tmp_path))
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path).values())


def test_nonfinite_skip_gives_up_after_k_in_a_row(tmp_path):
    cfg = toy_config("trainer.max_steps=50", "trainer.on_nonfinite=skip", "trainer.max_nonfinite_skips=3")
    cfg.model = {"_target_": "toy_family.BadAt", "image_size": 8, "channels": 1, "calls": list(range(2, 100)),
                 "bad": "loss"}
    trainer = _trainer(cfg, tmp_path)
    with pytest.raises(NonFiniteError, match="at step 2"):
        trainer.fit()
    assert trainer.family.calls_made == 1 + 4  # step 1, then 3 skips, then the 4th bad one stops the run
    with pytest.raises(NonFiniteError):
        run_training(cfg, tmp_path / "run")
    assert "non-finite" in json.loads((tmp_path / "run" / "status.json").read_text())["error"]


def test_every_phase_starts_with_clean_gradients(tmp_path):
    """A GAN's G phase back-propagates through D: D's next step must not see those gradients."""
    cfg = toy_config("trainer.max_steps=3", "optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false",
                     "trainer.lr=0.1")
    cfg.model = {"_target_": "toy_family.TwoPhases", "image_size": 8, "channels": 1}
    trainer = _trainer(cfg, tmp_path)
    trainer.fit()
    assert trainer.family.leftover == [0.0] * 6  # each phase of 3 steps found no gradient in its network


def test_diagnose_runs_every_diag_every_steps_without_moving_training(tmp_path):
    def run(diag_every, name):
        cfg = toy_config("trainer.max_steps=5", "trainer.log_every=1", noise=True)
        cfg.model = {"_target_": "toy_family.Diagnosing", "image_size": 8, "channels": 1, "diag_every": diag_every}
        trainer = _trainer(cfg, tmp_path / name)
        trainer.fit()
        return trainer.family.diagnosed, _metrics(tmp_path / name)

    seen, with_checks = run(2, "checked")
    assert seen == [2, 4]  # the step count the family had when each check ran
    never, without = run(0, "unchecked")
    assert never == [] and [r["loss"] for r in with_checks] == [r["loss"] for r in without]


def test_plateau_schedule_steps_on_the_logged_loss(tmp_path):
    cfg = toy_config("lr_schedule=plateau", "lr_schedule.patience=0", "lr_schedule.factor=0.5", "trainer.lr=0.01",
                     "trainer.max_steps=6", "trainer.log_every=1", "optimizer=sgd", "optimizer.momentum=0",
                     "optimizer.nesterov=false")
    cfg.model = {"_target_": "toy_family.BadAt", "image_size": 8, "channels": 1, "calls": [], "bad": "loss",
                 "constant_loss": True}  # the loss never improves: every log step halves the LR
    run_training(cfg, tmp_path)
    lrs = [row["lr_net"] for row in _metrics(tmp_path)]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] < lrs[0] and all(b <= a for a, b in zip(lrs, lrs[1:]))
