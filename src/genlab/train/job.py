"""One training job, from lock to summary line: what `genlab train`, `genlab resume` and a
requeued job all run.

`run_training` is the in-process API (tests, scripts): it holds the run's lock, keeps
status.json truthful whatever happens and returns the summary. `run_job` adds what a
command prints and how it ends: the run directory first, a one-line summary last, and
after a stop signal the hand-over to the scheduler's handler and exit code 128 + signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genlab.errors import ConfigError, GenlabError
from genlab.families.declarations import declared
from genlab.families.logged import losses
from genlab.run_dir import RunDir
from genlab.train.resume_policy import resume_decision

log = logging.getLogger("genlab")


def is_main_process() -> bool:
    """Rank 0 of a launched job, or a plain process (Accelerate is not set up yet when this is asked)."""
    return int(os.environ.get("RANK", "0")) == 0


def run_training(cfg: DictConfig, run_dir: str | Path, resume: bool | None = False,
                 trust_run: bool = False) -> dict[str, Any]:
    """Train `cfg` into `run_dir`; returns the summary (step, last logged scalars, best metric).

    Args:
        resume: continue from the newest complete checkpoint; None decides from the directory
            (`resume_decision`), as a requeued job must.
        trust_run: load training state of runs older than genlab 0.2 (see checkpoint.load_file_of).

    Raises:
        RunLocked: another process trains in `run_dir`.
        StopRequested: a stop signal arrived; a complete checkpoint was written first.
        GenlabError: a problem the message explains (status.json says "failed" once training began).
    """
    from genlab.config import check_values
    from genlab.train.loop import StopRequested, Trainer

    run = RunDir(run_dir)
    run.check_writable()
    main = is_main_process()
    with run.locked() if main else contextlib.nullcontext():
        trainer, fresh = None, not run.holds_run()
        try:
            # `genlab train` checks one representative job before Hydra starts; each job of a sweep
            # (`trainer.lr=1e-4,-1`) is checked here, so a bad value fails its own job only.
            check_values(cfg)
            trainer = Trainer(cfg, run, resume=resume, trust_run=trust_run)
            if main:
                run.write_status("running", max_steps=cfg.trainer.max_steps, step=trainer.step)
            summary = trainer.fit()
        except StopRequested as stop:
            if trainer and main:
                run.write_status("interrupted", signal=str(stop), step=trainer.step, max_steps=cfg.trainer.max_steps)
            _close(trainer, exit_code=1)
            raise
        except BaseException as error:
            # A new run that could not start has failed; an existing run whose resume was refused
            # (or could not start) is left as it was.
            if (trainer or fresh) and main:
                run.write_status("failed", error=str(error)[:500], step=trainer.step if trainer else 0,
                                 max_steps=cfg.trainer.max_steps)
            _close(trainer, exit_code=1)
            if isinstance(error.__cause__, GenlabError):  # Hydra's instantiate wraps the family's own errors
                raise error.__cause__ from None
            from genlab.train.strategy import explain_failure

            said = explain_failure(error)  # another node died, a penalty fsdp cannot take: one sentence, no traceback
            if said:
                raise GenlabError(said) from None
            raise
        if main:
            run.write_status("finished", max_steps=cfg.trainer.max_steps, step=summary["step"])
        _close(trainer)
    return summary


def _close(trainer: Any, exit_code: int = 0) -> None:
    if trainer is not None:
        trainer.tracker.finish(exit_code=exit_code)
        trainer.accelerator.end_training()


def run_job(cfg: DictConfig, run_dir: str | Path, resume: bool | None = None, trust_run: bool = False) -> dict:
    """`run_training` as a command runs it: prints the run directory and the summary line, and
    after a stop signal lets the scheduler's handler act (submitit requeues) and exits 128 + signal."""
    from genlab.train.loop import StopRequested

    main = is_main_process()
    if main:
        note = {True: " (resuming)", None: ""}.get(resume, "")
        if resume is None and resume_decision(RunDir(run_dir)) == "resume":
            note = " (resuming after an interruption)"
        print(f"run directory: {run_dir}{note}", flush=True)
    try:
        summary = run_training(cfg, run_dir, resume=resume, trust_run=trust_run)
    except StopRequested as stop:
        log.warning("stopped by %s after a checkpoint", stop)
        stop.hand_over()
        sys.exit(128 + stop.signum)
    if main:
        shown = "  ".join(f"{k}={v:.4g}" for k, v in summary_losses(cfg, summary).items())
        print(f"done: {summary['step']} steps  {shown}  -> {run_dir}", flush=True)
    return summary


def summary_losses(cfg: DictConfig, summary: dict[str, Any]) -> dict[str, float]:
    """The losses of a training's summary, as the run's family declares them (`families.logged.losses`)."""
    target = str(cfg.model.get("_target_", "")) if "model" in cfg else ""
    keys = losses(declared(target).get("losses"), summary)
    return {k: summary[k] for k in keys if isinstance(summary.get(k), (int, float))}


def check_resumable(run: RunDir, cfg: DictConfig) -> None:
    """Refuse `genlab resume` of a run that has nothing left to do, saying what would."""
    status = run.read_status()
    if status["status"] == "finished" and cfg.trainer.max_steps <= int(status.get("step", 0)):
        raise ConfigError(f"{run.path} finished at step {status.get('step')} of trainer.max_steps={cfg.trainer.max_steps}; "
                          f"to train further, raise it: `genlab resume {run.path} trainer.max_steps=N` with N > "
                          f"{status.get('step')}.")
