"""A shared run is untrusted input (issue 35): crafted runs never run code, write, delete or
embed anything outside themselves, never lose a finished run, never leak the environment, and
every bad input gets one sentence.

Each test copies one tiny finished DDPM run (the session's `tiny_ddpm_run`) and tampers with it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cli


class Payload:
    """Unpickling this runs code: it writes a marker file (what an attacker's pickle would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def run(tiny_ddpm_run, tmp_path) -> Path:
    """A copy of the shared tiny DDPM run that a test may tamper with."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_ddpm_run, copy, symlinks=True)
    return copy


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file (and link) under `root` by its relative path: the sha256 of its bytes (or the link's target)."""
    hashes = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            hashes[key] = "link:" + os.readlink(path)
        elif path.is_file():
            hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def assert_one_sentence(result, code: int, *expected: str) -> None:
    """Refused with exit `code`, one line on stderr naming `expected`, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], output


def set_target(run: Path, target: str, **kwargs) -> None:
    config = run / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["model"] = {"_target_": target, **kwargs}
    config.write_text(yaml.safe_dump(cfg))


# ---- 1. the `_target_` allowlist is checked on the object, not the string ------------------------------------
@pytest.mark.parametrize("target", ["torch.optim.optimizer.torch.load", "genlab.train.checkpoint.torch.load"])
def test_a_target_walking_around_the_allowlist_never_runs(run, tmp_path, target):
    """Hydra's locate follows module attributes: `<allowed module>.torch.load` is torch.load on a pickle."""
    marker = tmp_path / "marker"
    torch.save(Payload(marker), tmp_path / "payload.pt")
    set_target(run, target, f=str(tmp_path / "payload.pt"), weights_only=False)
    before = tree_hashes(run)
    for args in (["sample", run, "--n", "1", "--out", tmp_path / "x.png"], ["eval", run, "--n", "1"],
                 ["resume", run, "trainer.max_steps=6"]):
        result = cli(*args, check=False)
        assert not marker.exists(), f"{args[0]} ran the payload"
        assert_one_sentence(result, 2, f"model._target_='{target}'", "module torch", "nothing was loaded")
    assert tree_hashes(run) == before


def test_targets_are_checked_by_what_they_resolve_to():
    from genlab.run_dir import UntrustedConfig, check_targets

    for fine in ("torch.optim.AdamW", "torch.optim.lr_scheduler.ReduceLROnPlateau", "genlab.families.ddpm.DDPM",
                 "genlab.train.lr_schedules.cosine", "genlab.not_a_module.X"):  # the last: build() says so
        check_targets({"m": {"_target_": fine}}, "config.yaml")
    for bad, why in (("genlab.train.checkpoint.torch.load", "module torch"),
                     ("torch.optim.Adam.__init__.__globals__", "not a class or function"),
                     ("genlab.data.images.Path", "pathlib.Path, defined outside the allowed modules")):
        with pytest.raises(UntrustedConfig, match=why):
            check_targets({"m": {"_target_": bad}}, "config.yaml")
