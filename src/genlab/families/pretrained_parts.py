"""Pretrained parts of a latent diffusion family, found where a user may point: a hub id, a diffusers
directory or a genlab run (its export/); the base's scheduler; and what an export says about them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from genlab.errors import GenlabError
from genlab.run_dir import RunDir


def resolve_pretrained(path_or_id: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """Where `from_pretrained` should look for a component.

    Args:
        path_or_id: a genlab run directory (its `export/` is used), a diffusers directory
            (a pipeline or a single model), or a hub id.
        subfolder: the component's folder inside a pipeline ("unet", "vae", ...).

    Returns:
        (path or hub id, subfolder or None): a local single-model directory comes back
        with no subfolder, so a VAE run's `export/` works where a pipeline's `vae/` would.
    """
    path = Path(str(path_or_id)).expanduser()
    if not path.exists():
        if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
            raise GenlabError(f"{path_or_id}: no such directory. Give a genlab run, a diffusers directory or a hub id.")
        return str(path_or_id), subfolder  # a hub id
    if (run := RunDir(path)).is_run():
        if not run.export.is_dir():
            raise GenlabError(f"{path}: this run has no export/ yet; let its training finish (or `genlab resume` it).")
        path = run.export
    if subfolder and (path / subfolder).is_dir():
        return str(path / subfolder), None
    if (path / "config.json").exists() or (path / "tokenizer_config.json").exists():
        return str(path), None
    raise GenlabError(f"{path}: no {subfolder or 'model'} here (expected {subfolder}/ or a config.json).")


def load_pretrained(cls, path_or_id: str, subfolder: str | None = None, **kwargs):
    """`cls.from_pretrained` on whatever `resolve_pretrained` finds, with errors that say which.

    A hub id is tried as a pipeline (with `subfolder`) and then as a single model (a VAE or
    ControlNet repository has its config at the top).
    """
    where, sub = resolve_pretrained(path_or_id, subfolder)
    attempts = [{"subfolder": sub}, {}] if sub else [{}]
    for i, extra in enumerate(attempts):
        try:
            return cls.from_pretrained(where, **extra, **kwargs)
        except (OSError, ValueError) as e:
            if i == len(attempts) - 1:
                what = f"{subfolder} of " if subfolder else ""
                raise GenlabError(f"cannot load {cls.__name__} from {what}{path_or_id}: {e}".split("\n")[0]) from e


def base_scheduler(base: str | None):
    """The training scheduler of a pretrained base (DDPMScheduler, or FlowMatchEulerDiscreteScheduler
    for SD3/Flux bases, Sana's DPM-Solver), or None when training from scratch (the diffusion core builds one)."""
    if not base:
        return None
    where, sub = resolve_pretrained(base, "scheduler")
    config = DDPMScheduler.load_config(where, **({"subfolder": sub} if sub else {}))
    if config.get("_class_name", "").startswith("FlowMatch"):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    if config.get("prediction_type") == "flow_prediction":  # Sana's: DPM-Solver++ over flow sigmas
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(config)
    return DDPMScheduler.from_config(config)


def pipeline_location(path_or_id: str | None) -> str | None:
    """What plain diffusers' `from_pretrained` takes: a run's export/ or a local dir (absolute), or the hub id."""
    if path_or_id is None:
        return None
    path = Path(str(path_or_id)).expanduser()
    if not path.exists():
        return str(path_or_id)
    if (run := RunDir(path)).is_run():
        path = run.export
    return str(path.resolve())


def write_export_info(out_dir: Path, **info: Any) -> None:
    """`genlab_export.json`: where the base parts came from, for readers of the export."""
    (Path(out_dir) / "genlab_export.json").write_text(json.dumps(info, indent=2) + "\n")
