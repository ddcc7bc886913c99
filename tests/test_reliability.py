"""Pre-emption, disk full, read-only output, resumed metrics: promises of docs/reliability.md."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import TINY_DDPM, genlab, toy_config
from genlab.errors import GenlabError
from genlab.train.checkpoint import CheckpointWriteError, complete_checkpoints
from genlab.train.job import run_training
from genlab.train.loop import StopRequested


def _steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_preemption_signal_checkpoints_then_hands_over_to_submitit(tmp_path):
    """USR2 only sets a flag; the loop checkpoints at the step boundary, then submitit's handler runs."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # mocked scheduler
    try:
        cfg = toy_config("trainer.max_steps=8", "trainer.checkpoint_every=100")
        cfg.model = OmegaConf.create({"_target_": "toy_family.SignalAtStep", "image_size": 8, "channels": 1,
                                      "at_step": 2, "signum": int(signal.SIGUSR2)})
        with pytest.raises(StopRequested) as stop:
            run_training(cfg, tmp_path / "run")
        assert calls == []  # nothing requeued before the checkpoint is complete
        assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000003"]
        stop.value.hand_over()
        assert calls == [signal.SIGUSR2]
        assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "interrupted"
    finally:
        signal.signal(signal.SIGUSR2, previous)
    # the requeued job resumes and ends exactly where an uninterrupted run ends
    cfg.model.at_step = -1
    run_training(cfg, tmp_path / "run", resume=True)
    straight = toy_config("trainer.max_steps=8", "trainer.checkpoint_every=100", noise=True)
    run_training(straight, tmp_path / "straight")
    a = load_file(complete_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "net.safetensors")
    b = load_file(complete_checkpoints(tmp_path / "straight" / "checkpoints")[-1] / "net.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(tmp_path / "run") == list(range(1, 9))


def _metrics(run_dir):
    """metrics.jsonl without the wall-clock speed (the only value a restart changes)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_s"} for line in lines]


def test_a_preempted_run_logs_the_window_that_straddles_the_preemption_like_the_straight_run(tmp_path):
    """Logged every 4 steps, stopped at step 6: the line of step 8 is the mean of steps 5-8, not of 7-8."""
    overrides = ("trainer.max_steps=12", "trainer.log_every=4", "trainer.checkpoint_every=100")
    cfg = toy_config(*overrides)
    cfg.model = OmegaConf.create({"_target_": "toy_family.SignalAtStep", "image_size": 8, "channels": 1,
                                  "at_step": 5, "signum": int(signal.SIGTERM)})
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(StopRequested):
            run_training(cfg, tmp_path / "run")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000006"]
    cfg.model.at_step = -1
    run_training(cfg, tmp_path / "run", resume=True)
    run_training(toy_config(*overrides, noise=True), tmp_path / "straight")
    straight = _metrics(tmp_path / "straight")
    assert [m["step"] for m in straight] == [4, 8, 12] and straight[0]["loss"] != straight[1]["loss"]
    assert _metrics(tmp_path / "run") == straight  # bitwise, the straddling window included


@pytest.mark.slow  # a real subprocess run of ~10-25 s; `make test-slow` (CI) runs it
def test_sigterm_exits_143_after_a_checkpoint_and_rerun_resumes(tmp_path):
    """Through the CLI: SIGTERM mid-run -> exit 143 with a checkpoint; the same command again resumes."""
    run = tmp_path / "run"
    args = ["train", *TINY_DDPM, "trainer.max_steps=30", "trainer.sample_every=0", "trainer.checkpoint_every=1000",
            "trainer.log_every=1", f"hydra.run.dir={run}"]
    from conftest import GENLAB

    process = subprocess.Popen([GENLAB, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    import time

    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 143, output
    ckpts = complete_checkpoints(run / "checkpoints")
    assert len(ckpts) == 1
    stopped_at = json.loads((ckpts[0] / "state.json").read_text())["step"]
    assert 3 <= stopped_at < 30 and json.loads((run / "status.json").read_text())["status"] == "interrupted"
    result = genlab(*args)  # the same command, as a scheduler requeues it
    assert "resuming after an interruption" in result.stdout
    assert _steps(run) == list(range(1, 31))


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mounted under tmp_path (skips where mounting is not allowed)."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                                text=True)
        if result.returncode != 0:  # the reason shows in pytest's summary (-rs)
            why = (result.stderr.strip() or f"exit code {result.returncode}").splitlines()[0]
            pytest.skip(f"cannot mount a {size} tmpfs here, so the disk-full / read-only case is not tested: {why}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)  # busy: detach lazily


def test_disk_full_fails_within_one_save_and_keeps_the_previous_checkpoint(tmpfs):
    disk = tmpfs("1400k")  # room for one checkpoint of a 16 px Toy (~0.8 MB), not two
    cfg = toy_config("data.image_size=16", "trainer.max_steps=6", "trainer.checkpoint_every=1",
                     "trainer.keep_checkpoints=1")
    cfg.model.image_size = 16
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*step_000002.* KiB left on that disk") as error:
        run_training(cfg, disk / "run")
    assert "step_000001 is intact" in str(error.value)
    kept = complete_checkpoints(disk / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step_000001"]
    assert not list((disk / "run" / "checkpoints").glob(".*tmp"))  # the half-written one is gone
    weights = load_file(kept[0] / "net.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_read_only_output_fails_at_start_up(tmpfs):
    read_only = tmpfs("100k", read_only=True)
    with pytest.raises(GenlabError, match="cannot write to the run directory"):
        run_training(toy_config(), read_only / "run")


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    """Killed after logging step 5 but with a checkpoint at 4: the resumed log has no step twice."""
    run = tmp_path / "run"
    run_training(toy_config("trainer.max_steps=4", "trainer.checkpoint_every=4"), run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")  # logged, then killed before checkpoint 6
    run_training(toy_config("trainer.max_steps=6", "trainer.checkpoint_every=4"), run, resume=True)
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def _wandb_history(path: Path) -> tuple[str, list[dict]]:
    """(run id, history rows) of an offline `.wandb` file: W&B's LevelDB-style log of Record protos."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, run_id, rows = path.read_bytes(), 7, b"", None, []  # 7: the ":W&B" file header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768  # records never cross a 32 KiB block; a short tail is padding
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # a record still being written
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.HasField("run"):
                run_id = record.run.run_id
            if record.HasField("history"):
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return run_id, rows


def _written_history(path: Path, last_step: int, timeout: float = 60.0) -> tuple[str, list[dict]]:
    """The run id and history of a `.wandb` file once W&B's writer has flushed step `last_step`.

    `wandb.finish` returns before the service process has written everything to disk; reading
    at once saw a truncated file about half the time. Wait for the records the test needs.
    """
    import wandb

    wandb.teardown()  # stops the service, which flushes what it holds
    deadline = time.time() + timeout
    while True:
        run_id, rows = _wandb_history(path)
        if run_id and rows and rows[-1].get("_step") == last_step or time.time() > deadline:
            return run_id, rows
        time.sleep(0.2)


def test_wandb_offline_attempts_form_one_run_with_no_step_twice(tmp_path, monkeypatch):
    """Killed after logging step 5 with the newest checkpoint at 3: the resumed attempt sends W&B only 6..8."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    cfg = ["logger=wandb", "trainer.log_every=1", "trainer.checkpoint_every=3", "trainer.keep_checkpoints=null"]
    run_training(toy_config("trainer.max_steps=5", *cfg), run)
    for tmp in run.glob("checkpoints/step_000005"):  # as if killed before step 5's checkpoint was complete
        (tmp / "COMPLETE").unlink()
    run_training(toy_config("trainer.max_steps=8", *cfg), run, resume=True)

    metrics = {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(metrics) == list(range(1, 9))
    attempts = sorted(run.glob("wandb/offline-run-*/*.wandb"), key=lambda p: p.parent.name)  # by start time
    assert len(attempts) == 2
    histories = [_written_history(p, last_step) for p, last_step in zip(attempts, (5, 8))]
    assert histories[0][0] == histories[1][0] is not None  # one run id: `wandb sync` uploads them as one run
    rows = histories[0][1] + histories[1][1]
    assert [row["_step"] for row in rows] == list(range(1, 9))  # every step once, never backwards
    assert all(row["loss"] == metrics[row["_step"]]["loss"] for row in rows)  # and the values metrics.jsonl has


def test_changed_world_keeps_the_lr_or_refuses(tmp_path):
    """Another grad_accum on resume: the LR at every step is unchanged. Another global micro-batch: refused."""
    def cfg(steps, *extra):
        return toy_config(f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.checkpoint_every=3",
                          "lr_schedule=cosine", "lr_schedule.warmup_steps=2", "lr_schedule.total_steps=6", *extra)

    def lrs(run):
        return [row["lr_net"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    run_training(cfg(6), tmp_path / "straight")
    run_training(cfg(3), tmp_path / "changed")
    run_training(cfg(6, "trainer.grad_accum=2"), tmp_path / "changed", resume=True)
    assert lrs(tmp_path / "changed") == lrs(tmp_path / "straight")
    with pytest.raises(GenlabError, match="written with batch_size 8 x 1 processes; this run has 4 x 1"):
        run_training(cfg(9, "trainer.batch_size=4"), tmp_path / "changed", resume=True)
