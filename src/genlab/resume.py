"""`genlab resume`: continue a run in place, with its saved config plus overrides."""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from genlab.config import absolute_paths, check_values, closest, dotted_keys
from genlab.errors import ConfigError
from genlab.run_dir import RunDir
from genlab.urls import check_config_commands, commands_allowed

#: How a saved config's pipe: command is trusted on purpose (the refusal says it).
TRUST_IT = "pass --trust-run (or give it again as an override on this command line)"


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`key=value` overrides on a resolved run config; unknown keys are refused with a suggestion."""
    known = dotted_keys(cfg)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.startswith(("+", "~")) or "/" in key:
            raise ConfigError(f"resume takes key=value overrides of existing keys, not {override!r}")
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'{closest(key, known)}")
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
        except yaml.YAMLError:
            raise ConfigError(f"{override!r}: the value is not valid YAML; quote it") from None
    absolute_paths(cfg, Path.cwd(), keys=[o.partition("=")[0] for o in overrides])
    check_values(cfg)
    return cfg


def resume_run(run_dir: Path, overrides: list[str], allow: tuple[str, ...] = (), trust_run: bool = False) -> dict:
    """Continue `run_dir` from its newest complete checkpoint; overrides are saved into its config.

    A `pipe:` command in the saved config runs only with `trust_run`; one typed as an override
    here runs (urls.commands_allowed).
    """
    run = RunDir(run_dir).require()
    cfg = apply_overrides(run.read_config(allow), overrides)
    typed = [OmegaConf.select(cfg, o.partition("=")[0]) for o in overrides]
    with commands_allowed(typed=[v for v in typed if isinstance(v, str)], trust_all=trust_run, how=TRUST_IT):
        check_config_commands(cfg, str(run.config_file))
        return _resume(run, cfg, overrides, trust_run)


def _resume(run: RunDir, cfg: DictConfig, overrides: list[str], trust_run: bool) -> dict:
    import logging

    from genlab.train.job import check_resumable, is_main_process, run_job

    check_resumable(run, cfg)
    main = is_main_process()
    handler = logging.FileHandler(run.log_file)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    try:
        # No second resume (or train) may rewrite the config under a live run: rank 0 holds the lock.
        with run.locked() if main else contextlib.nullcontext():
            if overrides and main:  # the run's config stays the truth for `genlab sample` and the next resume
                run.write_config(cfg)
                run.add_resume_overrides(overrides)
            return run_job(cfg, run.path, resume=True, trust_run=trust_run)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
