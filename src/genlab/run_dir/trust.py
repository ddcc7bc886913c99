"""Nothing in a run directory instantiates what genlab does not trust: the `_target_` allowlist."""

from __future__ import annotations

import functools
import inspect
import os
import re
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, ListConfig

from genlab.errors import ConfigError

#: `_target_` prefixes a saved config may name: genlab's own classes and the library
#: classes genlab's configs use. Anything else needs the user's explicit `--allow-target`.
ALLOWED_TARGETS = ("genlab.", "torch.optim.", "bitsandbytes.optim.")
#: Extra trusted prefixes, comma-separated (e.g. a user's own family package).
ALLOWED_TARGETS_ENV = "GENLAB_ALLOW_TARGETS"


class UntrustedConfig(ConfigError):
    """A saved config names a `_target_` outside the allowlist (exit 2: nothing was loaded)."""


def allowed_targets(extra: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The allowlist: genlab's, then $GENLAB_ALLOW_TARGETS, then `extra` (--allow-target)."""
    from_env = [p.strip() for p in os.environ.get(ALLOWED_TARGETS_ENV, "").split(",") if p.strip()]
    return (*ALLOWED_TARGETS, *from_env, *extra)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


@functools.lru_cache(maxsize=1)
def shipped_functions() -> frozenset[str]:
    """The `_target_`s genlab's own configs name (configs/**/*.yaml), the only functions a run may name.

    A class under an allowed module builds an object; a function there may do anything it was
    written for (`genlab.run_dir.directory.atomic_write` writes any file), so only the builders
    genlab's configs use (lr schedules, `stable_diffusion`, `sketch_folder`, ...) pass, plus
    anything under a prefix the user trusts on purpose.
    """
    from genlab.config import config_dir

    found = set()
    for path in config_dir().rglob("*.yaml"):
        found.update(re.findall(r"_target_:\s*([\w.]+)", path.read_text()))
    return frozenset(found)


def _what_it_really_is(target: str, prefixes: tuple[str, ...], trusted: tuple[str, ...] = ()) -> str | None:
    """None when `target` names a class or function defined under an allowed module; else what it is.

    Hydra's `_locate` follows attributes as well as imports, so `torch.optim.optimizer.torch.load`
    is `torch.load`: a string prefix proves nothing. This walks the path the way `_locate` does
    (attribute first, then import) without calling anything, and refuses a module met under a
    name that is not its own (`checkpoint.torch` is the module `torch`), and an end that is not
    a class or function whose `__module__` is allowed. A path that cannot be located passes:
    `build` says it cannot be imported, and nothing is called.
    """
    from importlib import import_module

    parts = target.split(".")
    try:
        obj: Any = import_module(parts[0])
        for m, part in enumerate(parts[1:], start=1):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                if not isinstance(obj, ModuleType):
                    return None
                obj = import_module(".".join(parts[: m + 1]))
            if isinstance(obj, ModuleType) and obj.__name__ != ".".join(parts[: m + 1]):
                return f"the module {obj.__name__} reached through {'.'.join(parts[: m + 1])}"
    except Exception:  # noqa: BLE001  (not locatable: build() refuses it in its own sentence)
        return None
    module = str(getattr(obj, "__module__", None) or "")
    if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj)):
        return f"a {type(obj).__name__}, not a class or function"
    if not _under(module, prefixes):
        return f"{module}.{getattr(obj, '__qualname__', parts[-1])}, defined outside the allowed modules"
    if not inspect.isclass(obj) and target not in shipped_functions() and not _under(target, trusted):
        return "a function that no genlab config names (only classes and genlab's own builders are built)"
    return None


def check_targets(cfg: DictConfig | ListConfig | dict | list, source: str, allow: tuple[str, ...] = ()) -> None:
    """Refuse a config naming any `_target_` outside the allowlist, before anything is instantiated.

    Hydra's instantiate imports and calls whatever `_target_` names; its own blocklist stops
    `os.system` but not, e.g., a pickle loader. A config read from a run directory may have
    been written by anyone, so only known prefixes pass, and only when the name is the
    object's own: a class or function defined in an allowed module, not one of the modules
    or functions such a module imports (`genlab.train.checkpoint.torch.load`).

    Raises:
        UntrustedConfig: naming the key, the target and how to trust a prefix on purpose.
    """
    prefixes = allowed_targets(allow)
    trusted = prefixes[len(ALLOWED_TARGETS):]  # the user's own: $GENLAB_ALLOW_TARGETS and --allow-target

    def visit(node: Any, path: str) -> None:
        if isinstance(node, (dict, DictConfig)):
            items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
            for key, value in items:
                where = f"{path}.{key}" if path else str(key)
                if key == "_target_":
                    target = str(value)
                    really = _what_it_really_is(target, prefixes, trusted) if _under(target, prefixes) else None
                    if really:
                        hint = ("" if really.startswith("the module") else
                                f", or trust it on purpose: --allow-target {target}")
                        raise UntrustedConfig(f"{source}: {where}={target!r} is {really}, so nothing was loaded; "
                                              f"name a class by the module that defines it{hint}.")
                    if not _under(target, prefixes):
                        raise UntrustedConfig(
                            f"{source}: {where}={target!r} is not a class genlab trusts, so nothing was loaded. "
                            f"If you trust this run, allow that prefix on purpose: --allow-target {target.rsplit('.', 1)[0]} "
                            f"(or {ALLOWED_TARGETS_ENV}={target.rsplit('.', 1)[0]}).")
                else:
                    visit(value, where)
        elif isinstance(node, (list, ListConfig)):
            for i, value in enumerate(node):
                visit(value, f"{path}[{i}]")

    visit(cfg, "")
