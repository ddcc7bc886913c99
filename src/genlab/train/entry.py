"""`genlab train`'s Hydra entry point: the only place that calls @hydra.main.

Going through @hydra.main (not the compose API) keeps everything Hydra offers:
multirun, launchers (submitit), sweepers (Optuna), output directories, --cfg job.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from genlab.config import absolute_paths, config_dir
from genlab.errors import GenlabError
from genlab.run_dir import RunDir, claim_new_dir
from genlab.train.job import is_main_process, run_job, summary_losses
from genlab.train.world import world_from_slurm
from genlab.urls import check_config_commands, commands_allowed

log = logging.getLogger("genlab")
TYPE_IT = "give it as an override on this command line, e.g. data.path='pipe:...'"

# ${genlab_new_dir:PARENT}: a new run directory under PARENT, named by the start time and
# unique among simultaneous starts (see run_dir.claim_new_dir).
OmegaConf.register_new_resolver("genlab_new_dir", claim_new_dir, replace=True)


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def hydra_train(cfg: DictConfig) -> float | None:
    """Train one job; returns the sweep objective (by default the last logged loss) for sweepers.

    A job requeued after pre-emption (submitit re-runs it in the same directory) resumes
    from its checkpoint; a directory holding any other run is refused (resume_policy.resume_decision).
    """
    world_from_slurm()  # a SLURM task of a several-task job (submitit): one rank of one run, before anything asks
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # Relative model/data paths, absolute in the saved config: sample/resume work from any directory.
    if absolute_paths(cfg, Path(hydra_cfg.runtime.cwd)) and is_main_process() and hydra_cfg.output_subdir:
        RunDir(run_dir).write_config(cfg)
    try:
        with commands_allowed(how=TYPE_IT):  # the pipe: commands `genlab train` was typed with ($GENLAB_ALLOW_COMMANDS)
            check_config_commands(cfg, "the composed config")
            summary = run_job(cfg, run_dir, resume=None)
    except GenlabError as error:
        log.error("%s", error)
        if hydra_cfg.mode.name == "MULTIRUN":
            raise  # let the launcher record this job as failed and go on with the others
        sys.exit(error.exit_code)
    objective = cfg.get("sweep_objective") if "sweep_objective" in cfg else None
    return summary.get(objective) if objective else next(iter(summary_losses(cfg, summary).values()), None)
