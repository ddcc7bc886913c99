"""An Optuna study kept on disk and run as Hydra jobs: a sweep that outlives its sweeper.

Why genlab has its own sweeper (`hydra/sweeper=optuna`, registered by
`hydra_plugins/genlab_plugins/optuna_sweeper.py`) instead of hydra-optuna-sweeper: that plugin
pins optuna < 3 (2.10), whose SQLite storage fails under SQLAlchemy 2, so its study lives in
the sweeper's memory and a sweeper that dies after 40 of 100 trials loses all 40. This one is
Optuna's ask/tell API (optuna >= 4) around Hydra's launcher:

- The study is stored on disk: by default Optuna's JournalStorage in `<sweep dir>/optuna.journal`
  (a file, no database server); `hydra.sweeper.storage` may name an RDB URL instead
  (`sqlite:///study.db`, `postgresql://...`).
- Trial N runs as Hydra job N, in `<sweep dir>/N_<model>`. Rerunning the same command with the
  same `hydra.sweep.dir` continues the study: finished and failed trials are not run again and
  count towards `n_trials` (the total, over every rerun); a trial a dead sweeper left running
  is run again in its own directory, where `genlab train` resumes it from its newest
  checkpoint, or its result is read from the directory if its job finished after the sweeper died.
- The search space uses Hydra's sweep grammar: `choice(a, b)`, `interval(lo, hi)`,
  `tag(log, interval(lo, hi))`, `range(start, stop, step)`, from `hydra.sweeper.params` and from
  the command line; every other override is the same for all trials.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from genlab.errors import ConfigError

log = logging.getLogger("genlab")

JOURNAL = "optuna.journal"        # the study, when no storage URL is given
STUDY_FILE = "study.yaml"         # what this sweep folder holds: `genlab train` lets a rerun continue it
RESULTS = "optimization_results.yaml"
POLL_S = 15                       # how often a trial still running from a dead sweeper is looked at


@dataclass(frozen=True)
class Param:
    """One searched override: its key, Optuna's distribution, and (for choices) each value's override text."""

    key: str
    distribution: Any
    texts: tuple[tuple[Any, str], ...] = ()

    def override(self, value: Any) -> str:
        """The override a trial's job gets for `value`, e.g. `trainer.lr=0.00031`."""
        text = dict(self.texts).get(value) if self.texts else None
        return f"{self.key}={text if text is not None else repr(value) if isinstance(value, float) else value}"


def search_space(lines: Sequence[str]) -> tuple[dict[str, Param], list[str]]:
    """Split overrides into the searched parameters (Hydra sweeps) and the fixed overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    params, fixed = {}, []
    for override in OverridesParser.create().parse_overrides(list(lines)):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        sweep, log_scale = override.value(), "log" in override.value().tags
        if override.is_interval_sweep():
            low, high = sweep.start, sweep.end
            if "int" in override.value().tags:  # Hydra's interval() is always float: tag(int, interval(1, 8))
                params[key] = Param(key, IntDistribution(int(low), int(high), log=log_scale))
            else:
                params[key] = Param(key, FloatDistribution(low, high, log=log_scale))
        elif override.is_range_sweep() and all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
            values = list(override.sweep_iterator())
            params[key] = Param(key, IntDistribution(values[0], values[-1], step=sweep.step, log=log_scale))
        else:  # choice, or a range of floats: a categorical over the listed values
            values, texts = list(override.sweep_iterator()), list(override.sweep_string_iterator())
            if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
                values = texts  # lists and dicts: Optuna stores the override text itself
            params[key] = Param(key, CategoricalDistribution(values), tuple(zip(values, texts)))
    return params, fixed


def open_study(sweep_dir: Path, name: str | None, storage: str | None, direction: str,
               sampler: str = "tpe", seed: int | None = None) -> Any:
    """Create the study, or load it when this sweep folder (or the storage URL) already holds it."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"hydra.sweeper.direction={direction} is neither minimize nor maximize.")
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    if sampler not in samplers:
        raise ConfigError(f"hydra.sweeper.sampler={sampler} is unknown; choose one of {', '.join(samplers)}.")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if storage is None:
        journal = str(sweep_dir / JOURNAL)
        storage = JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal)))
    name = name or "genlab"
    study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True,
                                sampler=samplers[sampler](seed=seed))
    (sweep_dir / STUDY_FILE).write_text(yaml.safe_dump({"study_name": name, "storage": str(storage)
                                                        if isinstance(storage, str) else str(sweep_dir / JOURNAL)}))
    return study


@contextlib.contextmanager
def one_sweeper(sweep_dir: Path) -> Iterator[None]:
    """Hold the sweep folder's sweeper lock: two sweepers telling one study would run trials twice."""
    path = sweep_dir / ".sweeper.lock"
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another sweeper is running the study in {sweep_dir}; nothing was run. "
                              "Wait for it to end, or use another hydra.sweep.dir.") from None
        yield


def trial_dir(sweep_dir: Path, number: int) -> Path | None:
    """The run directory of trial `number` (Hydra job `number`), if its job has started."""
    return next((p for p in sorted(sweep_dir.glob(f"{number}_*")) if p.is_dir()), None)


def run_objective(run_dir: Path, objective: str | None) -> float | None:
    """The value a finished trial's job returned, read back from its run directory.

    `genlab train` returns `sweep_objective` from the run's summary (best_<metric> or a
    logged key), or the last logged loss; the directory keeps the same values.
    """
    from genlab.run_dir import RunDir
    from genlab.runs import run_info

    info = run_info(RunDir(run_dir))
    if objective:
        value = info["metrics"].get(objective)
    else:
        value = next(iter(info["losses"].values()), None)
    return float(value) if isinstance(value, (int, float)) else None


def check_same_sweep(study: Any, params: dict[str, Param], fixed: list[str], sweep_dir: Path) -> None:
    """A study continues only under the command that started it (the same space, the same fixed overrides)."""
    asked = {"space": sorted(f"{k}:{p.distribution!r}" for k, p in params.items()), "fixed": sorted(fixed)}
    stored = {k: study.user_attrs.get(k) for k in asked}
    if stored["space"] is None:
        for key, value in asked.items():
            study.set_user_attr(key, value)
        return
    if stored != asked:
        which = "search space" if stored["space"] != asked["space"] else "fixed overrides"
        theirs = " ".join(stored["fixed"]) if which == "fixed overrides" else ", ".join(stored["space"])
        raise ConfigError(f"the study in {sweep_dir} was started with another {which} ({theirs}); nothing was run. "
                          "Rerun the command that started it, or use another hydra.sweep.dir.")


Launch = Callable[[list[list[str]], int], Sequence[Any]]


class DurableSweep:
    """Runs a study's trials as batches of Hydra jobs until it holds `n_trials` ended trials."""

    def __init__(self, study: Any, params: dict[str, Param], fixed: list[str], sweep_dir: Path,
                 objective: str | None, launch: Launch):
        self.study, self.params, self.fixed, self.sweep_dir = study, params, fixed, sweep_dir
        self.objective, self.launch = objective, launch

    def overrides(self, trial_params: dict[str, Any]) -> list[str]:
        return [*self.fixed, *(self.params[k].override(v) for k, v in trial_params.items())]

    def ended(self) -> int:
        """Trials that count towards n_trials: complete, failed or pruned, over every rerun."""
        return sum(t.state.is_finished() for t in self.study.get_trials(deepcopy=False))

    def run(self, n_trials: int, n_jobs: int) -> list[Any]:
        from optuna.trial import TrialState

        returns: list[Any] = []
        stale = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if stale:
            log.info("the study in %s has %d trial(s) a sweeper left running: %s", self.sweep_dir, len(stale),
                     ", ".join(f"#{t.number}" for t in stale))
        for trial in stale:  # one at a time: each continues in its own directory
            returns += self.continue_trial(trial)
        done = self.ended()
        if done:
            log.info("the study holds %d ended trial(s) of hydra.sweeper.n_trials=%d", done, n_trials)
        while (left := n_trials - self.ended()) > 0:
            trials = [self.study.ask({k: p.distribution for k, p in self.params.items()})
                      for _ in range(min(n_jobs, left))]
            returns += self.run_batch(trials)
        self.write_results()
        return returns

    def continue_trial(self, trial: Any) -> list[Any]:
        """A trial left RUNNING: read its result if its job ended after the sweeper, else run it again."""
        from genlab.run_dir import RunDir

        run = trial_dir(self.sweep_dir, trial.number)
        status = RunDir(run).read_status()["status"] if run else "unknown"
        if status == "running":  # its job outlived the sweeper (a SLURM job): wait for its end
            log.info("trial #%d is still running in %s: waiting for it", trial.number, run)
            while (status := RunDir(run).read_status()["status"]) == "running":
                time.sleep(POLL_S)
        if status == "finished":
            self.tell(trial.number, run_objective(run, self.objective), "its job finished after the sweeper ended")
            return []
        log.info("trial #%d runs again in %s (genlab resumes it from its newest checkpoint)",
                 trial.number, run or self.sweep_dir)
        return self.run_batch([trial])

    def run_batch(self, trials: list[Any]) -> list[Any]:
        """Launch trials as Hydra jobs numbered by their trial numbers; tell the study each result."""
        numbers = [t.number for t in trials]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):  # another process asked in between
            return [r for t in trials for r in self.run_batch([t])]
        results = self.launch([self.overrides(t.params) for t in trials], numbers[0])
        for number, result in zip(numbers, results):
            value, why = None, "its job failed"
            if result.status.name == "COMPLETED":
                value, why = result.return_value, f"its job returned {result.return_value!r}"
            else:
                why = f"its job failed: {str(result._return_value).splitlines()[0] if result._return_value else '?'}"
            self.tell(number, value, why)
        self.write_results(quiet=True)
        return list(results)

    def tell(self, number: int, value: Any, why: str) -> None:
        from optuna.trial import TrialState

        if isinstance(value, (int, float)) and math.isfinite(value):
            self.study.tell(number, float(value))
            log.info("trial #%d: %s", number, value)
        else:
            self.study.tell(number, state=TrialState.FAIL)
            log.warning("trial #%d failed (%s); it counts towards n_trials", number, why)

    def write_results(self, quiet: bool = False) -> None:
        """optimization_results.yaml: the best trial so far (as hydra-optuna-sweeper wrote it)."""
        from optuna.trial import TrialState

        if not self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return
        best = self.study.best_trial
        results = {"name": self.study.study_name, "best_trial": best.number, "best_value": best.value,
                   "best_params": {k: _plain(v) for k, v in best.params.items()},
                   "best_run": str(trial_dir(self.sweep_dir, best.number))}
        (self.sweep_dir / RESULTS).write_text(yaml.safe_dump(results, sort_keys=False))
        if not quiet:
            log.info("Best value: %s (trial #%d, %s)", best.value, best.number,
                     " ".join(self.params[k].override(v) for k, v in best.params.items()))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
