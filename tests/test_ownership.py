"""One run directory, one owner: unique names, no training over a run, one live process, safe re-saves."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_DDPM, genlab, toy_config
from genlab.cli import app
from genlab.run_dir import RunDir, RunLocked, claim_new_dir
from genlab.train import checkpoint as ckpt
from genlab.train.job import run_training


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (the lock file aside) with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _claim(parent: str, barrier, out) -> None:
    barrier.wait()  # both processes claim at the same moment
    out.put(claim_new_dir(parent, fmt="%Y"))  # a one-year "second": the names always collide


def test_simultaneous_starts_get_two_directories(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_claim, args=(str(tmp_path), barrier, out)) for _ in range(2)]
    for w in workers:
        w.start()
    names = sorted(Path(out.get(timeout=120)).name for _ in workers)
    for w in workers:
        w.join(timeout=120)
    year = names[0]
    assert names == [year, f"{year}_2"]
    # one process asking again (Hydra resolves its run dir several times) gets the same answer
    assert claim_new_dir(str(tmp_path / "again"), fmt="%Y") == claim_new_dir(str(tmp_path / "again"), fmt="%Y")


def test_train_into_a_finished_run_refuses_and_changes_nothing(tiny_ddpm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_ddpm_run, run)
    before = snapshot(run)
    result = genlab("train", *TINY_DDPM, "trainer.max_steps=6", f"hydra.run.dir={run}", check=False)
    assert result.returncode == 2, result.stderr
    assert "already holds a run (finished at step 4)" in result.stderr and "genlab resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(run) == before


def test_a_multirun_into_a_used_sweep_folder_refuses(tiny_ddpm_run, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_ddpm_run, sweep / "0_ddpm")
    before = snapshot(sweep)
    result = CliRunner().invoke(app, ["train", "-m", *TINY_DDPM, "trainer.max_steps=1,2", f"hydra.sweep.dir={sweep}"])
    assert result.exit_code == 2 and "already holds runs (0_ddpm)" in result.output
    assert snapshot(sweep) == before


def test_a_second_process_on_a_live_run_is_refused(tiny_ddpm_run, tmp_path):
    """The lock is an flock: this test process holds it, as a live `genlab train` would."""
    run = tmp_path / "run"
    shutil.copytree(tiny_ddpm_run, run)
    before = snapshot(run)
    with RunDir(run).locked():
        (run / "status.json").write_text(json.dumps({"status": "running", "pid": os.getpid(), "time": 0,
                                                     "host": socket.gethostname()}))
        before = snapshot(run)
        resumed = genlab("resume", str(run), "trainer.max_steps=6", check=False)
        trained = genlab("train", *TINY_DDPM, f"hydra.run.dir={run}", check=False)
        assert RunDir(run).read_status()["status"] == "running"  # the lock says it is alive
    assert resumed.returncode == 1 and f"is in use by pid {os.getpid()}" in resumed.stderr, resumed.stderr
    assert trained.returncode == 2 and "running" in trained.stderr, trained.stderr
    assert snapshot(run) == before  # neither touched the config, the metrics or the checkpoints
    # Once the holder is gone (its flock dropped with it), the run reads as interrupted.
    assert RunDir(run).read_status()["status"] == "interrupted"


def test_lock_is_taken_over_from_a_dead_holder_and_refused_while_held(tmp_path):
    run = RunDir(tmp_path / "run")
    run.lock_file.parent.mkdir(parents=True)
    run.lock_file.write_text('{"pid": 999999, "host": "gone", "since": 0}')  # left by a killed process
    with run.locked():
        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as pool:
            message = pool.apply(_try_lock, (str(run.path),))
        assert message.startswith(f"{run.path} is in use by pid {os.getpid()}")
    with context.Pool(1) as pool:  # released at the end of the block
        assert pool.apply(_try_lock, (str(run.path),)) == "locked"


def _try_lock(path: str) -> str:
    try:
        with RunDir(path).locked():
            return "locked"
    except RunLocked as error:
        return str(error)


def test_run_training_refuses_a_directory_holding_a_run_unless_interrupted(tmp_path):
    run = tmp_path / "run"
    run_training(toy_config("trainer.max_steps=2"), run)
    with pytest.raises(Exception, match="already holds a run"):
        run_training(toy_config("trainer.max_steps=4"), run, resume=None)
    RunDir(run).write_status("interrupted")  # a requeued job: same directory, resumes
    summary = run_training(toy_config("trainer.max_steps=4"), run, resume=None)
    assert summary["step"] == 4


def _save(root: Path, step: int, value: float) -> Path:
    net = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(net.weight, value)
    return ckpt.save_checkpoint(root, step, {"net": net}, {}, {"step": step}, keep=None)


def test_a_kill_while_replacing_a_checkpoint_keeps_a_complete_one(tmp_path, monkeypatch):
    """Re-saving step 4 (the final save after a periodic one): killed between the two renames."""
    root = tmp_path / "checkpoints"
    _save(root, 2, 2.0)
    _save(root, 4, 4.0)
    real_replace, calls = os.replace, []

    def killed_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # the process dies here: nothing after runs
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 4, 5.0)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not (root / "step_000004").exists()  # renamed aside, its replacement never landed
    latest = ckpt.complete_checkpoints(root)[-1]
    assert latest.name.startswith(".step_000004.")  # the aside copy is found, not lost
    ckpt.load_networks(latest, {"net": (net := torch.nn.Linear(2, 2))})
    assert torch.all(net.weight == 4.0)
    ckpt.prune(root, keep=None)  # the next writer (holding the lock) puts it back
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000002", "step_000004"]
    assert ckpt.find_checkpoint(root, "step_4") == root / "step_000004"


def test_a_complete_re_save_replaces_and_leaves_no_leftovers(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 4, 4.0)
    _save(root, 4, 5.0)
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"]
    ckpt.load_networks(root / "step_000004", {"net": (net := torch.nn.Linear(2, 2))})
    assert torch.all(net.weight == 5.0)


def test_a_run_whose_lock_this_process_took_over_reads_as_interrupted(tmp_path):
    """A job rerun after kill -9 takes the lock, then asks whether the old run is alive: it is not."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.status_file.write_text(json.dumps({"status": "running", "pid": 999999, "time": 0,
                                           "host": socket.gethostname()}))
    with run.locked():
        assert run.read_status()["status"] == "interrupted"
        run.write_status("running")
        assert run.read_status()["status"] == "running"  # this process's own run is alive
