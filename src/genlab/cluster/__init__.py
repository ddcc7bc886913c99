"""Running sweeps on clusters: SLURM job states and summaries (`slurm`), Optuna studies that outlive their sweeper (`study`).

The Hydra plugins in `hydra_plugins/genlab_plugins/` only register these with Hydra.
"""
