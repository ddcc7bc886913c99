"""The Optuna sweeper end to end: trials train, evaluate, and the study minimises the eval metric."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml
from conftest import GENLAB, TINY_DDPM, genlab


@pytest.mark.slow  # a real subprocess run of ~10-25 s; `make test-slow` (CI) runs it
def test_optuna_sweep_minimises_the_best_eval_metric_and_runs_ranks_it(tmp_path):
    sweep = tmp_path / "sweep"
    result = genlab("train", "-m", "sweep=ddpm_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
                    *TINY_DDPM, "trainer.max_steps=2", "trainer.sample_every=0", "trainer.eval_every=2",
                    "trainer.eval_samples=16", f"hydra.sweep.dir={sweep}", env={"OMP_NUM_THREADS": "1"})
    trials = sorted(p.name for p in sweep.iterdir() if p.is_dir() and (p / "status.json").exists())
    assert trials == ["0_ddpm", "1_ddpm"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    fids = {}
    for trial in trials:
        state = yaml.safe_load((sweep / trial / "checkpoints" / "best" / "state.json").read_text())["best"]
        assert state["metric"] == "fid_digits_cnn"
        fids[trial] = state["best"]
    assert best["best_value"] == min(fids.values())  # the objective is the eval metric, not the loss
    assert set(best["best_params"]) == {"trainer.lr", "trainer.ema", "model.objective"}
    assert "Best value" in result.stdout + result.stderr

    ranked = genlab("runs", str(sweep), "--sort", "best_fid_digits_cnn").stdout
    order = sorted(fids, key=fids.get)
    assert ranked.index(order[0]) < ranked.index(order[1])


def _study_values(sweep):
    """{trial number: (state, value)} read from the sweep folder's journal with Optuna itself."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(sweep / "optuna.journal")))
    study = optuna.load_study(study_name="ddpm_optuna", storage=storage)
    return {t.number: (t.state.name, t.value) for t in study.trials}


def _metrics_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~60 s: a sweeper killed with SIGKILL mid-trial, then the same command again
def test_a_sweeper_killed_mid_study_continues_it_without_training_a_trial_twice(tmp_path):
    """3 trials; the sweeper (and with it the trial it runs in-process) is SIGKILLed while
    trial 1 trains. The same command again: trial 0 is not run again, trial 1 resumes from its
    newest checkpoint in its own directory, trial 2 runs, and the study's best value is reported."""
    sweep = tmp_path / "sweep"
    command = [GENLAB, "train", "-m", "sweep=ddpm_optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
               "sweep_objective=loss", *TINY_DDPM, "trainer.max_steps=1000", "trainer.log_every=50",
               "trainer.checkpoint_every=100", "trainer.sample_every=0", "trainer.eval_every=0",
               f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((sweep / "1_ddpm" / "checkpoints").glob("step_*")):  # trial 0 done, trial 1 past a checkpoint
        assert first.poll() is None and time.monotonic() < deadline, "the sweep ended before trial 1 checkpointed"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert json.loads((sweep / "1_ddpm" / "status.json").read_text())["status"] == "running"  # killed, unsaid
    states = _study_values(sweep)
    assert [states[0][0], states[1][0]] == ["COMPLETE", "RUNNING"] and 2 not in states
    trial_0 = {p.name: p.read_bytes() for p in (sweep / "0_ddpm").rglob("*") if p.is_file()}

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_ddpm", "1_ddpm", "2_ddpm"]
    assert "#0 :" not in output and {p.name: p.read_bytes() for p in (sweep / "0_ddpm").rglob("*")
                                      if p.is_file()} == trial_0  # trial 0 untouched
    assert "run directory: " + str(sweep / "1_ddpm") + " (resuming after an interruption)" in output
    assert _metrics_steps(sweep / "1_ddpm") == list(range(50, 1001, 50))  # each step logged once
    states = _study_values(sweep)
    assert [s for s, _ in states.values()] == ["COMPLETE"] * 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(v for _, v in states.values()) and "Best value" in output
