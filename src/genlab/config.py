"""Finding the configs and refusing bad ones before anything touches the disk.

Hydra's own message for a typo suggests *adding* the key (`+trainer.max_stepz=3`); a
user wants to hear "did you mean trainer.max_steps?". `validate_overrides` composes
the config with Hydra's compose API (no output directory, no logging set-up) and turns
every failure into a `ConfigError` (exit code 2) that names the wrong thing and the
closest valid one.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from genlab.errors import ConfigError
from genlab.urls import is_url


def config_dir() -> Path:
    """configs/ inside an installed wheel, else the repository's top-level configs/."""
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def cache_root() -> Path:
    """Where genlab keeps what it can rebuild (tokenizer, sketches, extractor weights, reference
    statistics): $GENLAB_CACHE, else ~/.cache/genlab."""
    return Path(os.environ.get("GENLAB_CACHE", "~/.cache/genlab")).expanduser()


def save_to_cache(target: Path, save_pretrained) -> None:
    """`save_pretrained(tmp)` into a temporary folder beside `target`, then rename it into place,
    so that concurrent first calls never see half a folder; the loser of a race drops its copy."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)


# Groups whose configs write anywhere in the config (package _global_). Their files start
# with the command that runs them, so they cannot carry Hydra's `# @package` header (it
# must be the first line); train.yaml declares the package instead, and users keep typing
# `experiment=x`, which `hydra_args` spells as Hydra wants it.
GLOBAL_GROUPS = ("experiment", "sweep")


def hydra_args(args: list[str]) -> list[str]:
    """`experiment=x` -> `experiment@_global_=x` (and the same for sweep=); other args unchanged."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in GLOBAL_GROUPS:
            arg = f"{key}@_global_={value}"
        out.append(arg)
    return out


def dotted_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Every key of `cfg` as a dotted path (`trainer.max_steps`), without resolving values."""
    keys = []
    if isinstance(cfg, DictConfig):
        for key in cfg.keys():
            path = f"{prefix}{key}"
            keys.append(path)
            node = cfg._get_node(key)
            if isinstance(node, (DictConfig, ListConfig)) and not node._is_missing() and not node._is_none():
                keys += dotted_keys(node, path + ".")
    return keys


def closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def representative_overrides(overrides: list[str]) -> list[str]:
    """One plain override per argument: the first value of each sweep (`lr=1e-4,2e-4`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as error:
        raise ConfigError(f"cannot parse the overrides: {error}") from None
    plain = []
    for override in parsed:
        if not override.is_sweep_override():
            plain.append(override.input_line)
        elif override.value_type is not None and override.value_type.name in ("CHOICE_SWEEP", "RANGE_SWEEP"):
            first = next(iter(override.sweep_string_iterator()))
            plain.append(f"{override.get_key_element()}={first}")
        # interval / glob sweeps are the sweeper's business; nothing to compose for them
    return plain


def validate_overrides(overrides: list[str], extra_dirs: list[str] = ()) -> DictConfig:
    """Compose train.yaml with `overrides` and check every value.

    Args:
        extra_dirs: config folders given with `--config-dir` (a user's own model/, data/, ...).

    Returns:
        The composed (unresolved) config.

    Raises:
        ConfigError: naming the unknown group option or key and the closest valid one.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    extra = [Path(d).resolve() for d in extra_dirs]
    search = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in extra)}]"] if extra else []
    plain = representative_overrides(overrides)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        group_overrides, key_overrides = [*search], []
        for line in plain:
            key, _, value = line.partition("=")
            bare = key.lstrip("+~").split("@")[0]
            options = sorted({*loader.get_group_options(bare), *(p.stem for d in extra for p in (d / bare).glob("*.yaml"))}
                             ) if "." not in bare else []
            if options or any((d / bare).is_dir() for d in (config_dir(), *extra)):
                # A list picks several options at once (logger=[wandb,tensorboard]).
                chosen = value[1:-1].split(",") if value.startswith("[") and value.endswith("]") else [value]
                for choice in (c.strip() for c in chosen):
                    if choice not in options and choice not in ("null", ""):
                        raise ConfigError(f"unknown choice {choice!r} for config group '{bare}'{closest(choice, options)} "
                                          f"(options: {', '.join(options)})")
                group_overrides.append(line)
            else:
                key_overrides.append((bare, key.startswith(("+", "~")), line))
        try:
            cfg = compose(config_name="train", overrides=group_overrides)
        except Exception as error:
            raise ConfigError(f"the config does not compose: {_first_line(error)}") from None
        known = dotted_keys(cfg)
        for bare, adds_or_deletes, line in key_overrides:
            if not adds_or_deletes and bare not in known and not bare.startswith("hydra."):
                raise ConfigError(f"unknown config key '{bare}'{closest(bare, known)} "
                                  "(use +key=value to add a new key on purpose)")
        try:
            cfg = compose(config_name="train", overrides=[*search, *plain])
        except Exception as error:
            raise ConfigError(f"the config does not compose: {_first_line(error)}") from None
    check_values(cfg)
    return cfg


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


_CHOICES = {
    "trainer.mixed_precision": ("no", "fp16", "bf16"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "trainer.progress": ("auto", "rich", "plain"),
}
_POSITIVE = ("trainer.max_steps", "trainer.batch_size", "trainer.grad_accum", "trainer.lr", "trainer.log_every")
_NON_NEGATIVE = ("trainer.sample_every", "trainer.checkpoint_every", "trainer.keep_checkpoints", "data.num_workers",
                 "trainer.sample_n")


def check_values(cfg: DictConfig) -> None:
    """Values that would only fail later (negative lr, grad_accum=0, unknown precision)."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; use one of: {', '.join(allowed)}")
    for key in _POSITIVE + _NON_NEGATIVE:
        value = OmegaConf.select(cfg, key)
        if value is None and key in _NON_NEGATIVE:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and key in _POSITIVE):
            bound = "> 0" if key in _POSITIVE else ">= 0"
            raise ConfigError(f"{key}={value!r} must be a number {bound}")
    for key in ("trainer.grad_accum", "trainer.max_steps", "trainer.batch_size"):
        if not isinstance(OmegaConf.select(cfg, key), int):
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r} must be a whole number")
    for key in ("trainer.effective_batch_size", "trainer.max_micro_batch", "data.prefetch_factor"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{key}={value!r} must be a whole number > 0, or null")
    for key in ("data.image_size", "data.channels"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a whole number > 0")
    clip = OmegaConf.select(cfg, "trainer.grad_clip")
    if clip is not None and (not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip <= 0):
        # A negative max norm flips every gradient (torch scales by max_norm / norm): the loss climbs.
        raise ConfigError(f"trainer.grad_clip={clip!r} must be a max gradient norm > 0, or null for no clipping")
    ema = OmegaConf.select(cfg, "trainer.ema")
    if ema not in (None, False) and not (isinstance(ema, float) and 0 < ema < 1):
        raise ConfigError(f"trainer.ema={ema!r} must be a decay in (0, 1), or null to turn EMA off")
    mode = OmegaConf.select(cfg, "logger.wandb.mode")
    if mode is not None and mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError(f"logger.wandb.mode={mode!r} is not allowed; use one of: auto, online, offline, disabled")


# Keys naming local files or folders. `genlab train` makes relative ones absolute (against the
# directory it runs from) before the run's config is saved, so `genlab sample/eval/resume RUN`
# work from any directory. The second kind may also be a hub id ("org/name"): it changes only
# when it is a path that exists there, or is written as one ("./x", "a/b/c"; see resolve_pretrained).
LOCAL_PATH_KEYS = ("model.tokenizer_dir", "model.teacher", "data.path", "data.cache_dir", "data.data_dir", "eval.cache_dir")
PATH_OR_HUB_KEYS = ("model.base", "model.base_config", "model.vae", "model.controlnet.pretrained")


def absolute_paths(cfg: DictConfig, cwd: Path, keys: list[str] | None = None) -> dict[str, str]:
    """Make the relative paths under the path keys (or those of them in `keys`) absolute, in place.

    Args:
        cfg: a composed config; absent, null and `~/...` values are left alone.
        cwd: the directory relative paths were meant from (where the user ran genlab).
        keys: only these dotted keys (e.g. the ones a `genlab resume` override set).

    Returns:
        {key: new absolute value} for the keys changed.
    """
    changed = {}
    for key in LOCAL_PATH_KEYS + PATH_OR_HUB_KEYS:
        if keys is not None and key not in keys:
            continue
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if not isinstance(value, str) or not value or value.startswith("~") or Path(value).is_absolute():
            continue
        if is_url(value):  # s3://..., https://..., a typed pipe: command: not a path under cwd
            continue
        local = Path(cwd) / value
        if key in PATH_OR_HUB_KEYS and not (local.exists() or value.startswith(".") or value.count("/") > 1):
            continue  # a hub id
        changed[key] = os.path.normpath(local)
        OmegaConf.update(cfg, key, changed[key], merge=False)
    return changed


def build(key: str, node: Any, **kwargs: Any) -> Any:
    """`instantiate(node)`, with the failures a user can fix said in one sentence naming `key`.

    A family's or dataset's own GenlabError comes through as it is (Hydra wraps it).
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from genlab.errors import GenlabError

    try:
        return instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as error:
        if isinstance(error.__cause__, GenlabError):
            raise error.__cause__ from None
        target = node.get("_target_") if hasattr(node, "get") else None
        cause = error.__cause__ or error
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if isinstance(cause, (ImportError, AttributeError)) or "locating target" in str(error):
            raise ConfigError(f"{key}._target_={target!r} cannot be imported ({reason}); check the name, or put "
                              "its package on PYTHONPATH.") from None
        if isinstance(cause, TypeError):
            raise ConfigError(f"{key}: {target} does not take these arguments ({reason}); check {key}'s keys.") from None
        raise
