"""What may be committed: no built packages, no large files (a 10.6 MB wheel once sat at the root),
and no `sys.path` edits (scripts/ is a package; pytest's `pythonpath` and PYTHONPATH do the rest).

History keeps every byte ever committed, so a large file is caught before it lands, not after.
Measurements belong in `benchmarks/*.json`; a figure a page shows stays well under the limit.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000
BUILT = (".whl", ".egg", ".tar.gz", ".zip")  # packages come from a registry, never from the tree
LARGE_ALLOWED: frozenset[str] = frozenset()  # paths (relative to the root) allowed over MAX_BYTES, each with a reason


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing is tracked")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def offending(paths: list[str], size_of) -> list[str]:
    """The tracked paths that break the rules, each with the rule it breaks."""
    found = []
    for path in paths:
        if path.endswith(BUILT):
            found.append(f"{path}: a built package (install it from the registry instead)")
            continue
        size = size_of(path)
        if size is not None and size > MAX_BYTES and path not in LARGE_ALLOWED:
            found.append(f"{path}: {size / 1e6:.1f} MB, over {MAX_BYTES / 1e6:.0f} MB")
    return found


def test_the_rules_catch_a_wheel_and_a_large_file():
    sizes = {"ruff-0.17.6-py3-none-any.whl": 10, "benchmarks/big.json": 2_000_000, "src/genlab/cli.py": 20_000}
    assert offending(list(sizes), sizes.get) == [
        "ruff-0.17.6-py3-none-any.whl: a built package (install it from the registry instead)",
        "benchmarks/big.json: 2.0 MB, over 1 MB",
    ]


def test_nothing_built_or_large_is_tracked():
    def size_of(path: str) -> int | None:
        file = ROOT / path
        return file.stat().st_size if file.is_file() else None  # deleted in the work tree: not committed again

    assert offending(tracked_files(), size_of) == []


PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\[[^\]]*\]\s*=(?!=)|[+]?=(?!=))")


# The rule's own examples name the path list through a placeholder, so that no line of this file reads as an
# edit (to this test, which scans this file too, or to any other line-by-line scanner).
EDITS = ["SYS_PATH.insert(0, str(ROOT / 'scripts'))", "import sys; SYS_PATH.append({tests!r})", "SYS_PATH[:0] = [here]"]
MENTIONS = ["found on SYS_PATH without importing it", "SYS_PATH == x"]


def test_the_path_rule_catches_an_edit_and_not_a_mention():
    def real(example: str) -> str:
        return example.replace("SYS_PATH", "sys" + ".path")

    assert all(PATH_EDIT.search(real(e)) for e in EDITS)
    assert not any(PATH_EDIT.search(real(m)) for m in MENTIONS)


def test_nothing_edits_sys_path():
    """Code strings that tests run in a subprocess included: they get PYTHONPATH in their environment."""
    found = [f"{file.relative_to(ROOT)}:{n}" for top in ("src", "scripts", "tests") for file in sorted((ROOT / top).rglob("*.py"))
             for n, line in enumerate(file.read_text().splitlines(), 1) if PATH_EDIT.search(line)]
    assert found == []
