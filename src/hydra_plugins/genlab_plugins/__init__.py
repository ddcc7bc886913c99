"""genlab's Hydra plugins (Hydra finds plugins only under the `hydra_plugins` namespace).

`slurm_launcher.GenlabSlurmLauncher` (hydra/launcher=slurm) and `optuna_sweeper.GenlabOptunaSweeper`
(hydra/sweeper=optuna). Their logic lives in `genlab.cluster`; these modules only register them.
"""
