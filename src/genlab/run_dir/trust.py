"""Nothing in a run directory instantiates what genlab does not trust: the `_target_` allowlist."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, ListConfig

from genlab.errors import GenlabError

#: `_target_` prefixes a saved config may name: genlab's own classes and the library
#: classes genlab's configs use. Anything else needs the user's explicit `--allow-target`.
ALLOWED_TARGETS = ("genlab.", "torch.optim.", "bitsandbytes.optim.")
#: Extra trusted prefixes, comma-separated (e.g. a user's own family package).
ALLOWED_TARGETS_ENV = "GENLAB_ALLOW_TARGETS"


class UntrustedConfig(GenlabError):
    """A saved config names a `_target_` outside the allowlist."""


def allowed_targets(extra: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The allowlist: genlab's, then $GENLAB_ALLOW_TARGETS, then `extra` (--allow-target)."""
    from_env = [p.strip() for p in os.environ.get(ALLOWED_TARGETS_ENV, "").split(",") if p.strip()]
    return (*ALLOWED_TARGETS, *from_env, *extra)


def check_targets(cfg: DictConfig | ListConfig | dict | list, source: str, allow: tuple[str, ...] = ()) -> None:
    """Refuse a config naming any `_target_` outside the allowlist, before anything is instantiated.

    Hydra's instantiate imports and calls whatever `_target_` names; its own blocklist stops
    `os.system` but not, e.g., a pickle loader. A config read from a run directory may have
    been written by anyone, so only known prefixes pass.

    Raises:
        UntrustedConfig: naming the key, the target and how to trust a prefix on purpose.
    """
    prefixes = allowed_targets(allow)

    def visit(node: Any, path: str) -> None:
        if isinstance(node, (dict, DictConfig)):
            items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
            for key, value in items:
                where = f"{path}.{key}" if path else str(key)
                if key == "_target_":
                    target = str(value)
                    if not any(target == p or target.startswith(p if p.endswith(".") else p + ".") for p in prefixes):
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
