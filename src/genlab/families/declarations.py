"""A family's declared name and losses, read from its source without importing it.

`genlab runs` shows a row per run: the family's name and its last losses (`Family.name`,
`Family.losses`). Importing a family's module to read two class attributes costs the import of
torch and diffusers, about 11 s on a 2-core machine, and would run code named by a copied run's
config. So they are read here from the module's source with `ast`: a class attribute assigned a
literal (`name = "ddpm"`, `losses = ("loss",)`), on the class or on a base class (of the same
module, or imported from another by name). A builder function (`genlab.families.sd.stable_diffusion`) stands for the class it names as
its `family` (`stable_diffusion.family = StableDiffusion`), and a package that imports the class from
one of its modules (`genlab.families.gan`) for that module. Nothing of the family runs; what
cannot be read this way comes back as {} and the caller says what it does instead.
"""

from __future__ import annotations

import ast
import importlib.machinery
from functools import lru_cache
from typing import Any

#: the declarations read here: the ones whose values are literals (the card is read from the class itself)
READ = ("name", "losses", "metrics")


@lru_cache(maxsize=64)
def declared(target: str) -> dict[str, Any]:
    """{"name": ..., "losses": (...), "metrics": {...}} as the class `target` (module.Class) declares them.

    {} when the module cannot be found or read, or names no such class.
    """
    module, _, name = target.rpartition(".")
    source = _source_file(module) if module else None
    try:
        tree = ast.parse(open(source, encoding="utf-8").read()) if source else None
    except (ValueError, OSError, SyntaxError):
        return {}
    if tree is None:
        return {}
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    imported = {alias.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom)
                and node.module and not node.level for alias in node.names if alias.asname is None}
    name = _builder_family(tree, name) or name
    if name in classes:
        return _class_attributes(classes, imported, name, set())
    if name in imported:  # a package handing the class on: `from genlab.families.gan.family import GAN`
        return declared(f"{imported[name]}.{name}")
    return {}


def _source_file(module: str) -> str | None:
    """Where `module`'s source is, found on sys.path without importing it or its packages (their
    `__init__` would run)."""
    search = None
    for part in module.split("."):
        spec = importlib.machinery.PathFinder.find_spec(part, search)
        if spec is None:
            return None
        search = spec.submodule_search_locations
    return spec.origin if spec.origin and spec.origin.endswith(".py") else None


def _builder_family(tree: ast.Module, name: str) -> str | None:
    """For a builder function: the class name of its module-level `<name>.family = <Class>`."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and len(node.targets) == 1
                and isinstance(target := node.targets[0], ast.Attribute) and target.attr == "family"
                and isinstance(target.value, ast.Name) and target.value.id == name):
            return node.value.id
    return None


def _class_attributes(classes: dict[str, ast.ClassDef], imported: dict[str, str], name: str,
                      seen: set[str]) -> dict[str, Any]:
    """The literal READ attributes of class `name`, its own over those of its bases (of this module, or
    imported by name: `from genlab.families.controlnet_card import ControlNetFamily`)."""
    seen.add(name)
    found: dict[str, Any] = {}
    for base in reversed(classes[name].bases):  # the first base wins, as in Python's attribute lookup
        if isinstance(base, ast.Name) and base.id in classes and base.id not in seen:
            found.update(_class_attributes(classes, imported, base.id, seen))
        elif isinstance(base, ast.Name) and base.id in imported:
            found.update(declared(f"{imported[base.id]}.{base.id}"))
    for node in classes[name].body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) and node.value is not None else None
        if isinstance(target, ast.Name) and target.id in READ:
            try:
                found[target.id] = ast.literal_eval(node.value)
            except ValueError:  # not a literal: left to whoever imports the class
                continue
    return found
