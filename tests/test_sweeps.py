"""The Optuna sweeper end to end: trials train, evaluate, and the study minimises the eval metric."""

from __future__ import annotations

import pytest
import yaml
from conftest import TINY_DDPM, genlab


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
