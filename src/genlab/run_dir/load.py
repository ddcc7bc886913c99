"""Finding runs under a folder, and rebuilding a family from a run without running code from it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genlab.errors import ConfigError, GenlabError
from genlab.run_dir.directory import RunDir
from genlab.urls import check_config_commands

log = logging.getLogger(__name__)


def find_runs(root: str | Path) -> list[RunDir]:
    """Every run directory under `root` that training has written to, sorted by path."""
    found = (RunDir(p.parent.parent) for p in Path(root).rglob(".hydra/config.yaml"))
    return sorted((r for r in found if r.holds_run()), key=lambda r: str(r.path))


def newest_finished_run(root: str | Path) -> RunDir:
    """The most recently finished run under `root` (by the time in its status.json)."""
    finished = [(status.get("time", 0), str(r.path)) for r in find_runs(root)
                if (status := r.read_status())["status"] == "finished"]
    if not finished:
        raise GenlabError(f"no finished run under {root}/; pass a run directory (see `genlab runs`).")
    return RunDir(max(finished)[1])


def load_family(run: RunDir | str | Path, checkpoint: str = "latest", use_ema: bool = True, device: str | None = None,
                allow: tuple[str, ...] = (), trust_run: bool = False,
                ema_length: float | None = None) -> tuple[Any, DictConfig]:
    """(family, cfg) rebuilt from a run's saved config, with the weights of `checkpoint`.

    Nothing in the run runs code: the config's `_target_`s pass the allowlist first, a `pipe:`
    command in it is refused unless the caller allowed it (urls.commands_allowed, which
    `--trust-run` sets), weights are safetensors and the EMA state loads with
    weights_only=True. A damaged newest checkpoint falls back to the previous complete one,
    with a warning.

    Args:
        checkpoint: latest | best | step_N.
        use_ema: the EMA weights, when the run has them.
        ema_length: instead, the EMA of this relative length rebuilt from the run's post-hoc EMA
            snapshots (trainer.posthoc_ema) up to the checkpoint's step.
        allow: extra trusted `_target_` prefixes; trust_run: see checkpoint.load_file_of.

    Raises:
        GenlabError: saying what is wrong with the run or the request.
    """
    import torch
    from diffusers.training_utils import EMAModel

    from genlab.config import build
    from genlab.train import checkpoint as ckpt

    run = run if isinstance(run, RunDir) else RunDir(run)
    cfg = run.require().read_config(allow)
    check_config_commands(cfg, str(run.config_file))  # before anything of it is built or opened
    if checkpoint == "latest":
        candidates = ckpt.complete_checkpoints(run.checkpoints, warn=True)
    else:
        try:
            found = run.checkpoint(checkpoint)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        candidates = [found] if found else []
    if not candidates:
        raise GenlabError(f"{run.path} has no complete checkpoint '{checkpoint}' (it may still be starting, or "
                          "have failed before the first save); see `genlab runs`.")
    family = build("model", cfg.model)
    networks = family.networks()

    def load(path: Path) -> Path:
        ckpt.load_networks(path, networks)
        if ema_length is not None:
            load_posthoc_ema(run, family, path, ema_length)
            return path
        if use_ema and family.ema_network:
            ema_state = ckpt.load_file_of(path, "ema.pt", trust_run)
            if ema_state is not None:
                target = networks[family.ema_network]
                ema = EMAModel(target.parameters())
                ema.load_state_dict(ema_state)
                ema.copy_to(target.parameters())
                log.info("loaded %s (EMA weights)", path)
                return path
        log.info("loaded %s", path)
        return path

    ckpt.newest_loadable(candidates, load)

    family.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    for network in networks.values():
        network.eval()
    return family, cfg


def load_posthoc_ema(run: RunDir, family: Any, checkpoint: Path, ema_length: float) -> None:
    """Put the EMA of relative length `ema_length` at `checkpoint`'s step into the family's EMA network."""
    import torch

    from genlab.posthoc_ema import reconstruct_named
    from genlab.train import checkpoint as ckpt

    if not family.ema_network:
        raise GenlabError(f"--ema-length: {run.path}'s model has no network that takes an EMA.")
    step = ckpt.load_state(checkpoint)["step"]
    averages = reconstruct_named(run.posthoc_ema, ema_length, step)
    network = family.networks()[family.ema_network]
    params = dict(network.named_parameters())
    unknown = sorted(set(averages) - set(params))
    if unknown:
        raise GenlabError(f"{run.posthoc_ema} holds parameters this run's model does not have ({unknown[0]}, ...): "
                          "the snapshots belong to another run.")
    wrong = next((n for n, a in averages.items() if a.shape != params[n].shape), None)
    if wrong:
        raise GenlabError(f"{run.posthoc_ema} holds {wrong} of shape {tuple(averages[wrong].shape)}, the model "
                          f"{tuple(params[wrong].shape)}: the snapshots belong to another run.")
    with torch.no_grad():
        for name, average in averages.items():
            params[name].copy_(average)
    log.info("loaded %s with the EMA of length %.3g rebuilt from post-hoc snapshots", checkpoint, ema_length)
