"""hydra/launcher=slurm: Hydra's submitit SLURM launcher, waiting on every job and summarising them.

What changes against `hydra_plugins.hydra_submitit_launcher` is in `genlab.cluster.slurm`: job
states from `squeue` where `sacct` has no accounting, every job of a batch waited for (a failed or
lost one is reported, not raised), and the batch shell made to survive a signal meant for the job
steps (`scancel --full --signal=USR2`): the steps checkpoint and requeue.
"""


from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


@dataclass
class GenlabSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.genlab_plugins.slurm_launcher.GenlabSlurmLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="genlab_slurm", node=GenlabSlurmConf, provider="genlab")


class GenlabSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:  # noqa: D102
        import submitit
        from omegaconf import OmegaConf

        from genlab.cluster import slurm

        submitit.SlurmJob.watcher = watcher = slurm.QueueWatcher()
        watcher.use_squeue = None
        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base_keys else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        numbered = list(enumerate(map(list, job_overrides), start=initial_job_idx))
        jobs = executor.map_array(self, *zip(*[(o, "hydra.sweep.dir", i, f"job_id_for_{i}", Singleton.get_state())
                                               for i, o in numbered]))
        slurm.wait_all(jobs)
        # Each job names its run directory `<job number>_<model>` when it starts; a job that never started has none.
        run_dirs = [next(sweep_dir.glob(f"{i}_*"), sweep_dir / str(i)) for i, _ in numbered]
        summaries = [slurm.job_summary(job, run_dir) for job, run_dir in zip(jobs, run_dirs)]
        slurm.log_summary([filter_overrides(o) for _, o in numbered], initial_job_idx, summaries)
        failed = [(i, status, error) for (i, _), (status, error) in zip(numbered, summaries) if status != "finished"]
        returns = []
        for job, (i, overrides), run_dir in zip(jobs, numbered, run_dirs):
            try:
                ret = job.results()[0]
            except Exception:  # ended without a result: no JobReturn came back
                ret = JobReturn(overrides=overrides, working_dir=str(run_dir))
                ret.status = JobStatus.FAILED
            if ret.status == JobStatus.FAILED:  # one sentence for the user, not the job's traceback
                ret.return_value = slurm.SweepJobsFailed(failed, len(numbered), sweep_dir)
            returns.append(ret)
        return returns
