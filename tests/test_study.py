"""genlab's Optuna sweeper without training: the search space, the stored study, its continuation.

A fake launcher stands in for Hydra's: each "job" returns a value computed from its overrides, so
the bookkeeping (how many trials, which are run again, what is told to the study) is checked in
milliseconds; tests/test_sweeps.py and tests/test_slurm.py run the same code with real jobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from genlab.cluster import study as durable
from genlab.errors import ConfigError

optuna = pytest.importorskip("optuna")


def test_hydra_sweep_syntax_becomes_optuna_distributions():
    params, fixed = durable.search_space(["trainer.lr=tag(log, interval(1e-5, 1e-2))", "trainer.ema=choice(0.99,0.999)",
                                          "model.unet.layers=range(1,5)", "data.image_size=8",
                                          "trainer.steps=tag(int, interval(10, 20))"])
    assert fixed == ["data.image_size=8"]
    lr, ema, layers, steps = (params[k].distribution for k in
                              ("trainer.lr", "trainer.ema", "model.unet.layers", "trainer.steps"))
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log and (lr.low, lr.high) == (1e-5, 1e-2)
    assert isinstance(ema, optuna.distributions.CategoricalDistribution) and ema.choices == (0.99, 0.999)
    assert isinstance(layers, optuna.distributions.IntDistribution) and (layers.low, layers.high) == (1, 4)
    assert isinstance(steps, optuna.distributions.IntDistribution) and not steps.log
    assert params["trainer.ema"].override(0.999) == "trainer.ema=0.999"


def _job(value: float | None) -> SimpleNamespace:
    """What Hydra's launcher returns for one job: a status and the task's return value."""
    status = SimpleNamespace(name="COMPLETED" if value is not None else "FAILED")
    return SimpleNamespace(status=status, return_value=value, _return_value=None if value is not None else "boom")


def _finished_run(sweep: Path, number: int, loss: float) -> None:
    run = sweep / f"{number}_toy"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "model: {_target_: toy_family.Toy}\ndata: {_target_: toy_family.Data}\ntrainer: {max_steps: 1}\n")
    (run / "status.json").write_text(json.dumps({"status": "finished", "time": 0}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": loss}) + "\n")


def _sweep(sweep: Path, launched: list, fail: set = frozenset()) -> durable.DurableSweep:
    params, fixed = durable.search_space(["trainer.lr=interval(0.0, 1.0)", "data.image_size=8"])
    study = durable.open_study(sweep, "s", None, "minimize", sampler="random", seed=0)
    durable.check_same_sweep(study, params, fixed, sweep)

    def launch(batch, first):
        launched.append(list(range(first, first + len(batch))))
        jobs = []
        for number, overrides in enumerate(batch, start=first):
            lr = float(next(o for o in overrides if o.startswith("trainer.lr=")).split("=")[1])
            _finished_run(sweep, number, lr)
            jobs.append(_job(None if number in fail else lr))
        return jobs

    return durable.DurableSweep(study, params, fixed, sweep, "loss", launch)


def test_a_study_runs_n_trials_in_batches_of_n_jobs_and_a_rerun_adds_none(tmp_path):
    launched: list = []
    _sweep(tmp_path, launched, fail={1}).run(n_trials=5, n_jobs=2)
    assert launched == [[0, 1], [2, 3], [4]]  # job numbers are trial numbers
    study = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / durable.JOURNAL))))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    results = (tmp_path / durable.RESULTS).read_text()
    assert f"best_value: {study.best_value}" in results and f"{study.best_trial.number}_toy" in results

    again: list = []
    _sweep(tmp_path, again).run(n_trials=5, n_jobs=2)
    assert again == []  # n_trials counts the study's total, over every rerun
    _sweep(tmp_path, again).run(n_trials=6, n_jobs=2)
    assert again == [[5]]


def test_a_trial_left_running_is_read_if_it_finished_else_run_again_under_its_number(tmp_path):
    first: list = []
    sweep = _sweep(tmp_path, first)
    sweep.run(n_trials=1, n_jobs=1)
    space = {k: p.distribution for k, p in sweep.params.items()}
    finished_meanwhile, killed = (sweep.study.ask(space) for _ in range(2))  # a dead sweeper's two running trials
    _finished_run(tmp_path, finished_meanwhile.number, 0.5)
    (tmp_path / f"{killed.number}_toy").mkdir()
    (tmp_path / f"{killed.number}_toy" / "status.json").write_text(json.dumps({"status": "interrupted", "time": 0}))

    launched: list = []
    _sweep(tmp_path, launched).run(n_trials=3, n_jobs=2)
    assert launched == [[killed.number]]  # the finished one is told from its run directory
    trials = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / durable.JOURNAL)))).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 and trials[1].value == 0.5


def test_a_rerun_with_another_search_space_is_refused(tmp_path):
    _sweep(tmp_path, []).run(n_trials=1, n_jobs=1)
    study = durable.open_study(tmp_path, "s", None, "minimize")
    params, fixed = durable.search_space(["trainer.lr=interval(0.0, 2.0)", "data.image_size=8"])
    with pytest.raises(ConfigError, match="started with another search space"):
        durable.check_same_sweep(study, params, fixed, tmp_path)
    params, fixed = durable.search_space(["trainer.lr=interval(0.0, 1.0)", "data.image_size=16"])
    with pytest.raises(ConfigError, match="started with another fixed overrides"):
        durable.check_same_sweep(study, params, fixed, tmp_path)


def test_two_sweepers_on_one_folder_are_refused(tmp_path):
    import multiprocessing

    with durable.one_sweeper(tmp_path):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            message = pool.apply(_try_sweeper, (str(tmp_path),))
    assert message.startswith(f"another sweeper is running the study in {tmp_path}"), message
    with durable.one_sweeper(tmp_path):  # released
        pass


def _try_sweeper(path: str) -> str:
    try:
        with durable.one_sweeper(Path(path)):
            return "held"
    except ConfigError as error:
        return str(error)
