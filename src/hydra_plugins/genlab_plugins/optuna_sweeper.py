"""hydra/sweeper=optuna: an Optuna study on disk, run through any Hydra launcher (genlab.cluster.study).

No `from __future__ import annotations` here: Hydra's plugin scan imports this module, and the
structured config below must keep real types (a broken plugin breaks every `genlab train`).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper


@dataclass
class GenlabOptunaConf:
    _target_: str = "hydra_plugins.genlab_plugins.optuna_sweeper.GenlabOptunaSweeper"
    direction: str = "minimize"          # minimize | maximize the job's return value (sweep_objective)
    study_name: Optional[str] = None     # the study's name in its storage (default: genlab)
    storage: Optional[str] = None        # null: a journal file in the sweep folder; or sqlite:///..., postgresql://...
    n_trials: int = 20                   # trials in all, over every rerun of the sweep
    n_jobs: int = 2                      # trials launched at once (one launcher batch)
    sampler: str = "tpe"                 # tpe | random
    seed: Optional[int] = None           # the sampler's seed
    params: Dict[str, str] = field(default_factory=dict)  # the search space, in Hydra's sweep grammar


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=GenlabOptunaConf, provider="genlab")


class GenlabOptunaSweeper(Sweeper):
    def __init__(self, direction: str, study_name: Optional[str], storage: Optional[str], n_trials: int,
                 n_jobs: int, sampler: str, seed: Optional[int], params: Dict[str, str]) -> None:
        self.options = dict(direction=direction, name=study_name, storage=storage, sampler=sampler, seed=seed)
        self.n_trials, self.n_jobs, self.params = n_trials, n_jobs, dict(params or {})

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from omegaconf import OmegaConf

        from genlab.cluster import study as durable

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        params, fixed = durable.search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with durable.one_sweeper(sweep_dir):
            study = durable.open_study(sweep_dir, **self.options)
            durable.check_same_sweep(study, params, fixed, sweep_dir)
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

            def launch(batch: List[List[str]], first: int) -> Any:
                self.validate_batch_is_legal(batch)
                return self.launcher.launch(batch, initial_job_idx=first)

            objective = self.config.get("sweep_objective") if "sweep_objective" in self.config else None
            sweep = durable.DurableSweep(study, params, fixed, sweep_dir, objective, launch)
            return sweep.run(self.n_trials, self.n_jobs)
