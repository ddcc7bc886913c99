"""`genlab train`'s Hydra entry point: the only place that calls @hydra.main.

Going through @hydra.main (not the compose API) keeps everything Hydra offers:
multirun, launchers (submitit), sweepers (Optuna), output directories, --cfg job.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from genlab.config import absolute_paths, config_dir
from genlab.errors import GenlabError

log = logging.getLogger("genlab")


def run_stamp(fmt: str) -> str:
    """The run directory's timestamp: now, or under a multi-process launcher the launcher's
    start time, so that every rank of one job agrees on one directory."""
    started = time.time()
    if int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1:
        import psutil

        started = psutil.Process(os.getppid()).create_time()
    return time.strftime(fmt, time.localtime(started))


OmegaConf.register_new_resolver("genlab_stamp", run_stamp, replace=True)


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def hydra_train(cfg: DictConfig) -> float | None:
    """Train one job; returns the sweep objective (the last logged loss) for sweepers."""
    from genlab.train.loop import StopRequested, run_training

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0
    # Relative model/data paths, absolute in the saved config: sample/resume work from any directory.
    if absolute_paths(cfg, Path(hydra_cfg.runtime.cwd)) and main_process and hydra_cfg.output_subdir:
        (run_dir / hydra_cfg.output_subdir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    # A job requeued after pre-emption (submitit re-runs it in the same directory) picks up
    # from its checkpoint instead of starting over.
    status = run_dir / "status.json"
    resume = status.exists() and json.loads(status.read_text())["status"] == "interrupted"
    if main_process:
        print(f"run directory: {run_dir}{' (resuming after an interruption)' if resume else ''}", flush=True)
    try:
        summary = run_training(cfg, run_dir, resume=resume)
    except StopRequested as stop:
        stop.hand_over()  # under submitit: requeue this job, then exit
        sys.exit(128 + stop.signum)
    except GenlabError as error:
        log.error("%s", error)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise  # let the launcher record this job as failed and go on with the others
        sys.exit(error.exit_code)
    losses = {k: v for k, v in summary.items() if "loss" in k}
    shown = "  ".join(f"{k}={v:.4g}" for k, v in losses.items())
    if main_process:
        print(f"done: {summary['step']} steps  {shown}  -> {run_dir}", flush=True)
    objective = cfg.get("sweep_objective") if "sweep_objective" in cfg else None
    return summary.get(objective) if objective else next(iter(losses.values()), None)
