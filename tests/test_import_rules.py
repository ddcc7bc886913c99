"""The layers of docs/architecture.md, held against the code's import statements.

Every `import` and `from ... import` in src/ is read with `ast` (at the top of a file and inside
functions alike: a lazy import is still a dependency), so the architecture page cannot drift
from the code again. A module imports only what stands on a lower layer, or its own package;
the few imports that run upward are named in UPWARD, each with the loop it closes, and one that
is no longer there must leave the list too. No file imports itself through others (no circles),
in src/ nor in scripts/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# From the ground up; a module may import its own package and what stands on a lower line.
LAYERS = [
    ["genlab.errors"],
    ["genlab.urls", "genlab.wrappers", "genlab.step_random", "genlab.posthoc_ema"],
    ["genlab.config", "genlab.diffusion"],
    ["genlab.text", "genlab.data", "genlab.run_dir"],
    ["genlab.families"],
    ["genlab.model_card"],
    ["genlab.eval"],
    ["genlab.train", "genlab.push"],
    ["genlab.runs", "genlab.resume"],
    ["genlab.sample", "genlab.report", "genlab.cluster"],
    ["genlab.cli", "hydra_plugins"],
    ["genlab.__main__"],
]

# (importer, imported): the imports that run against the layers, as docs/architecture.md names them.
UPWARD = {
    ("genlab.run_dir.directory", "genlab.train.checkpoint"): "find_checkpoint asks checkpoint.py what is complete",
    ("genlab.run_dir.load", "genlab.train.checkpoint"): "load_family reads a checkpoint's weights",
    ("genlab.model_card", "genlab.report.collect"): "the card's metrics table reads `resolved` from the report",
    ("genlab.families.repa", "genlab.eval.features"): "REPA's offline encoder is the evaluation's digits classifier",
}


def modules(top: Path, package_root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `top`."""
    found = {}
    for file in sorted(top.rglob("*.py")):
        parts = list(file.relative_to(package_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = file
    return found


def imports_of(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that `file` (module `name`) imports, anywhere in the file."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, else (below) the module
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from genlab.run_dir import RunDir` -> genlab.run_dir
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(top: Path, package_root: Path) -> dict[str, set[str]]:
    known = modules(top, package_root)
    return {name: imports_of(name, file, known) for name, file in known.items()}


def layer_of(module: str) -> int | None:
    for level, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return level
    return None


def upward(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs where the imported module stands on a higher layer than its importer."""
    found = set()
    for importer, imported in edges.items():
        for target in imported:
            low, high = layer_of(importer), layer_of(target)
            if low is not None and high is not None and high > low:
                found.add((importer, target))
    return found


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of two or more modules (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def src_graph() -> dict[str, set[str]]:
    return graph(ROOT / "src", ROOT / "src")


def test_every_module_stands_on_a_layer():
    assert [name for name in src_graph() if name != "genlab" and layer_of(name) is None] == []


def test_imports_run_downward_but_for_the_named_exceptions():
    found = upward(src_graph())
    assert sorted(found - set(UPWARD)) == [], "an import runs up the layers of docs/architecture.md"
    assert sorted(set(UPWARD) - found) == [], "an exception is gone: take it out of UPWARD and the architecture page"


def test_no_module_imports_itself_through_others():
    assert circles(src_graph()) == []
    assert circles(graph(ROOT / "scripts", ROOT)) == []


def test_scripts_are_imported_by_nothing_in_src():
    assert not any(target.startswith("scripts") for targets in src_graph().values() for target in targets)


def test_the_rules_see_a_lazy_upward_import_and_a_circle(tmp_path):
    package = tmp_path / "genlab"
    (package / "train").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("def f():\n    from genlab.train import loop\n")
    (package / "train" / "__init__.py").write_text("")
    (package / "train" / "loop.py").write_text("from . import job\n")
    (package / "train" / "job.py").write_text("from genlab.train.loop import Trainer\nfrom genlab.errors import f\n")
    edges = graph(tmp_path, tmp_path)
    assert upward(edges) == {("genlab.errors", "genlab.train.loop")}
    assert circles(edges) == [["genlab.errors", "genlab.train.job", "genlab.train.loop"]]
