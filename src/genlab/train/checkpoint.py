"""Crash-safe checkpoints: a directory is either complete or ignored.

Layout of `checkpoints/step_000500/`:
    <network>.safetensors   weights of each trainable network (loadable without genlab's optimizers)
    training_state.pt       optimizers, LR schedules, grad scaler, RNG states
    ema.pt                  EMA weights (diffusers EMAModel state), when EMA is on
    state.json              step, data position, W&B run id, ...
    COMPLETE                written last

A save writes everything into `.step_000500.tmp/`, fsyncs each file, writes COMPLETE,
renames the directory into place and fsyncs the parent: a kill at any moment leaves
either the old set of checkpoints or the new one, never a half-written `step_*`.
Old checkpoints are deleted only after the new one is complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from genlab.errors import GenlabError

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointWriteError(GenlabError):
    """A checkpoint could not be written (disk full, read-only, ...); the previous one is intact."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_root: Path, step: int, networks: dict[str, torch.nn.Module],
                    files: dict[str, Any], state: dict[str, Any], keep: int | None, name: str | None = None) -> Path:
    """Write checkpoint `step` atomically, then prune to the `keep` newest complete ones.

    Args:
        networks: saved as `<name>.safetensors`.
        files: objects saved with torch.save under their file names (None values are skipped).
        state: JSON-able facts (step, data position, ...) saved as state.json.
        name: directory name instead of step_N (e.g. "best"); such a checkpoint is never pruned.

    Returns:
        The final checkpoint directory.
    """
    final = ckpt_root / (name or f"step_{step:06d}")
    tmp = ckpt_root / f".{final.name}.tmp"
    try:
        _write(ckpt_root, final, tmp, step, networks, files, state)
    except (OSError, RuntimeError) as error:  # disk full, quota, read-only; torch.save says RuntimeError
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        free_kib = shutil.disk_usage(ckpt_root).free // 1024 if ckpt_root.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(ckpt_root)
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {reason} ({free_kib} KiB left on that disk). "
            f"The previous checkpoint {previous[-1] if previous else '(none)'} is intact; free space or "
            "move the run, then `genlab resume`.") from None
    prune(ckpt_root, keep)
    return final


def prune(ckpt_root: Path, keep: int | None) -> None:
    """Keep the `keep` newest complete checkpoints (all if None/0); clear leftovers of killed saves."""
    if keep:
        for old in complete_checkpoints(ckpt_root)[:-keep]:
            # Rename first: a kill during the deletion leaves a hidden folder, never a
            # half-deleted step_N that looks like an interrupted save.
            doomed = old.with_name(f".{old.name}.deleting")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    for leftover in ckpt_root.glob(".*.deleting"):
        shutil.rmtree(leftover, ignore_errors=True)


def _write(ckpt_root: Path, final: Path, tmp: Path, step: int, networks: dict[str, torch.nn.Module],
           files: dict[str, Any], state: dict[str, Any]) -> None:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, network in networks.items():
        # clone(): safetensors refuses tensors that share storage (tied weights).
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()},
                  tmp / f"{name}.safetensors")
    for filename, obj in files.items():
        if obj is not None:
            torch.save(obj, tmp / filename)
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        _fsync(f)
    (tmp / MARKER).write_text(f"step {step}\n")
    _fsync(tmp / MARKER)
    _fsync(tmp)
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(ckpt_root)


def complete_checkpoints(ckpt_root: Path, warn: bool = False) -> list[Path]:
    """Complete checkpoint directories, oldest first; incomplete ones are skipped (with a warning if asked)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.iterdir():
        match = _STEP_DIR.match(d.name)
        if not match or not d.is_dir():
            continue
        if (d / MARKER).exists():
            found.append((int(match.group(1)), d))
        elif warn:
            log.warning("skipping incomplete checkpoint %s (no %s marker: the save was interrupted)", d, MARKER)
    return [d for _, d in sorted(found)]


def find_checkpoint(run_dir: Path, which: str = "latest") -> Path | None:
    """Resolve "latest", "best" or "step_N" to a complete checkpoint directory of `run_dir`."""
    root = Path(run_dir) / "checkpoints"
    complete = complete_checkpoints(root, warn=True)
    if which == "latest":
        return complete[-1] if complete else None
    if which == "best":
        best = root / "best"
        return best if (best / MARKER).exists() else None
    match = re.fullmatch(r"step_?(\d+)", which)
    if match:
        wanted = root / f"step_{int(match.group(1)):06d}"
        return wanted if wanted in complete else None
    raise ValueError(f"--checkpoint {which!r}: use latest, best or step_N")


def load_networks(ckpt: Path, networks: dict[str, torch.nn.Module]) -> None:
    """Load each network's weights from `ckpt` in place."""
    for name, network in networks.items():
        network.load_state_dict(load_file(ckpt / f"{name}.safetensors"))


def load_file_of(ckpt: Path, filename: str) -> Any:
    """A torch-saved file of a checkpoint, or None if it has none."""
    path = ckpt / filename
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def load_state(ckpt: Path) -> dict[str, Any]:
    """The state.json of a checkpoint (step, data position, W&B id, ...)."""
    return json.loads((ckpt / "state.json").read_text())
