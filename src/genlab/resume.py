"""`genlab resume`: continue a run in place, with its saved config plus overrides."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from genlab.config import _closest, absolute_paths, check_values, dotted_keys
from genlab.errors import ConfigError
from genlab.train.loop import StopRequested, load_run_config, run_training

log = logging.getLogger("genlab")


def apply_overrides(cfg, overrides: list[str]):
    """`key=value` overrides on a resolved run config; unknown keys are refused with a suggestion."""
    known = dotted_keys(cfg)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.startswith(("+", "~")) or "/" in key:
            raise ConfigError(f"resume takes key=value overrides of existing keys, not {override!r}")
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'{_closest(key, known)}")
        OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    absolute_paths(cfg, Path.cwd(), keys=[o.partition("=")[0] for o in overrides])
    check_values(cfg)
    return cfg


def resume_run(run_dir: Path, overrides: list[str]) -> dict:
    run_dir = Path(run_dir)
    cfg = apply_overrides(load_run_config(run_dir), overrides)
    if overrides:  # the run's config stays the truth for `genlab sample` and the next resume
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        with open(run_dir / ".hydra" / "overrides.yaml", "a") as f:
            yaml.safe_dump([f"(resume) {o}" for o in overrides], f)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    print(f"run directory: {run_dir} (resuming)", flush=True)
    try:
        summary = run_training(cfg, run_dir, resume=True)
    except StopRequested as stop:
        log.warning("stopped by %s after a checkpoint", stop)
        stop.hand_over()
        sys.exit(128 + stop.signum)
    shown = "  ".join(f"{k}={v:.4g}" for k, v in summary.items() if "loss" in k)
    print(f"done: {summary['step']} steps  {shown}  -> {run_dir}", flush=True)
    return summary
