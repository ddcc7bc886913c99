"""Crash-safe checkpoints: a directory is either complete or ignored.

Layout of `checkpoints/step_000500/`:
    <network>.safetensors   weights of each trainable network (loadable without genlab's optimizers);
                            a partly frozen one (LoRA on a pretrained base) keeps only its
                            trainable parameters and buffers: the family rebuilds the rest
    training_state.pt       optimizers, LR schedules, grad scaler, RNG states
    ema.pt                  EMA weights (diffusers EMAModel state), when EMA is on
    state.json              step, data position, W&B run id, ...
    COMPLETE                written last

A save writes everything into `.step_000500.<pid>.tmp/`, fsyncs each file, writes COMPLETE,
renames the directory into place and fsyncs the parent: a kill at any moment leaves
either the old set of checkpoints or the new one, never a half-written `step_*`.
Old checkpoints are deleted only after the new one is complete; a checkpoint saved again
under the same name (the final save right after a periodic one, a new `best`) is first
renamed aside, and a kill between the two renames leaves that copy to be found instead.

Everything is read back without running code: weights are safetensors, the other `.pt`
files load with `weights_only=True` (tensors and plain Python values only).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from genlab.errors import GenlabError

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
#: safetensors metadata of a network file that holds only the trainable part of its network.
CONTENTS, TRAINABLE_ONLY, PROBE = "genlab_contents", "trainable_only", "genlab_frozen_probe"
_STEP_DIR = re.compile(r"^step_(\d+)$")
#: A checkpoint renamed aside while a new one of the same name replaces it: `.<name>.<pid>.replaced`.
_REPLACED = re.compile(r"^\.(.+)\.\d+\.replaced$")
#: What the training state of runs written before genlab 0.2 needs beyond plain values:
#: numpy's RNG state (a uint32 array). `--trust-run` allows exactly these.
OLD_RUN_GLOBALS = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                   "numpy.dtype", "numpy.dtypes.UInt32DType")


class CheckpointWriteError(GenlabError):
    """A checkpoint could not be written (disk full, read-only, ...); the previous one is intact."""


class CheckpointCorrupt(GenlabError):
    """A file of a complete checkpoint cannot be read (damaged, truncated, edited)."""


class UnsafeCheckpoint(GenlabError):
    """A checkpoint file would need unpickling objects beyond tensors and plain values."""


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
    tmp = ckpt_root / f".{final.name}.{os.getpid()}.tmp"  # per process: two writers never share one
    try:
        _write(ckpt_root, final, tmp, step, networks, files, state)
    except (OSError, RuntimeError) as error:  # disk full, quota, read-only; torch.save says RuntimeError
        raise write_failed(ckpt_root, final, tmp, error) from None
    prune(ckpt_root, keep)
    return final


def write_failed(ckpt_root: Path, final: Path, tmp: Path, error: BaseException) -> CheckpointWriteError:
    """Remove the half-written `tmp` and say what failed, how much disk is left and which checkpoint is intact."""
    reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
    free_kib = shutil.disk_usage(ckpt_root).free // 1024 if ckpt_root.exists() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    previous = complete_checkpoints(ckpt_root)
    return CheckpointWriteError(
        f"could not write checkpoint {final}: {reason} ({free_kib} KiB left on that disk). "
        f"The previous checkpoint {previous[-1] if previous else '(none)'} is intact; free space or "
        "move the run, then `genlab resume`.")


def prune(ckpt_root: Path, keep: int | None) -> None:
    """Keep the `keep` newest complete checkpoints (all if None/0); clear leftovers of killed saves.

    Only the process holding the run's lock calls this, so every other temporary folder is a
    leftover of a killed save. Nothing is deleted through a linked `checkpoints` folder: it may be
    another run's (RunDir refuses such a run before it is locked; this is the last line).
    """
    if ckpt_root.is_symlink():
        log.warning("%s is a link; old checkpoints are not deleted through it", ckpt_root)
        return
    _recover_replaced(ckpt_root)
    for leftover in ckpt_root.glob(".*.tmp"):
        if leftover.name.endswith(f".{os.getpid()}.tmp"):
            continue
        shutil.rmtree(leftover, ignore_errors=True)
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
        tensors, metadata = network_state(network)
        save_file(tensors, tmp / f"{name}.safetensors", metadata=metadata or None)
    for filename, obj in files.items():
        if obj is not None:
            torch.save(obj, tmp / filename)
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    seal(ckpt_root, final, tmp, step)


def seal(ckpt_root: Path, final: Path, tmp: Path, step: int) -> None:
    """Make the written folder `tmp` the checkpoint `final`: fsync its files, write COMPLETE last, rename.

    Also the last step of a sharded save (train/sharded_checkpoint.py), once every process's shards are in `tmp`.
    """
    for f in tmp.iterdir():
        _fsync(f)
    (tmp / MARKER).write_text(f"step {step}\n")
    _fsync(tmp / MARKER)
    _fsync(tmp)
    if not final.exists():
        os.replace(tmp, final)
        _fsync(ckpt_root)
        return
    # Saved again under the same name: the complete copy goes aside first, and is deleted only
    # once the new one is in place (a kill in between: `_recover_replaced` / `_replaced_copy`).
    aside = final.with_name(f".{final.name}.{os.getpid()}.replaced")
    os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(ckpt_root)
    shutil.rmtree(aside)


def _recover_replaced(ckpt_root: Path) -> None:
    """Put back a checkpoint renamed aside by a save that was killed before its replacement landed."""
    for aside in ckpt_root.glob(".*.replaced"):
        original = ckpt_root / _REPLACED.match(aside.name).group(1) if _REPLACED.match(aside.name) else None
        if original is not None and not original.exists() and (aside / MARKER).exists():
            os.replace(aside, original)
            log.warning("recovered %s from an interrupted save", original)
        else:
            shutil.rmtree(aside, ignore_errors=True)


def _replaced_copy(ckpt_root: Path, name: str) -> Path | None:
    """A complete copy of checkpoint `name` left aside by a killed save (read-only fallback)."""
    for aside in ckpt_root.glob(f".{name}.*.replaced"):
        if (aside / MARKER).exists():
            return aside
    return None


def complete_checkpoints(ckpt_root: Path, warn: bool = False) -> list[Path]:
    """Complete checkpoint directories, oldest first; incomplete ones are skipped (with a warning if asked)."""
    if not ckpt_root.is_dir():
        return []
    found = {}
    for d in ckpt_root.iterdir():
        aside = _REPLACED.match(d.name)
        match = _STEP_DIR.match(aside.group(1) if aside else d.name)
        if not match or not d.is_dir():
            continue
        if aside and (ckpt_root / aside.group(1)).exists():
            continue  # the replacement landed; this copy is a leftover
        if (d / MARKER).exists():
            found[int(match.group(1))] = d
        elif warn and not aside:
            log.warning("skipping incomplete checkpoint %s (no %s marker: the save was interrupted)", d, MARKER)
    return [found[step] for step in sorted(found)]


def find_checkpoint(root: Path, which: str = "latest") -> Path | None:
    """Resolve "latest", "best" or "step_N" to a complete checkpoint directory under `root`.

    Args:
        root: a run's checkpoints folder (`RunDir.checkpoints`; `RunDir.checkpoint` is the usual door).
    """
    root = Path(root)
    complete = complete_checkpoints(root, warn=True)
    if which == "latest":
        return complete[-1] if complete else None
    if which == "best":
        best = root / "best"
        return best if (best / MARKER).exists() else _replaced_copy(root, "best")
    match = re.fullmatch(r"step_?(\d+)", which)
    if match:
        wanted = f"step_{int(match.group(1)):06d}"
        return next((c for c in complete if c.name == wanted or c.name.startswith(f".{wanted}.")), None)
    raise ValueError(f"--checkpoint {which!r}: use latest, best or step_N")


def _frozen_names(network: torch.nn.Module) -> list[str]:
    return sorted(n for n, p in network.named_parameters(remove_duplicate=False) if not p.requires_grad)


def _probe(network: torch.nn.Module, names: list[str], per_tensor: int = 4) -> list[list[float]]:
    """A few evenly spaced values of each frozen tensor: a cheap check that the base is the same."""
    params = dict(network.named_parameters(remove_duplicate=False))
    probe = []
    for name in names:
        tensor = params[name].detach()
        if type(tensor) is not torch.Tensor:  # a quantised frozen base (torchao's tensor subclasses): its values
            tensor = tensor.dequantize()
        flat = tensor.reshape(-1)
        picks = sorted({(flat.numel() - 1) * i // (per_tensor - 1) for i in range(per_tensor)}) if flat.numel() else []
        probe.append([float(f"{v:.5g}") for v in flat[torch.tensor(picks, dtype=torch.long, device=flat.device)]
                      .float().cpu().tolist()])
    return probe


def network_state(network: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a checkpoint keeps of `network`: (tensors, safetensors metadata).

    A network whose parameters all train is saved whole. One with frozen parameters
    (requires_grad=False: a pretrained U-Net under LoRA, Control-LoRA's frozen copy) keeps
    only its trainable parameters and buffers, since the family's constructor rebuilds the
    frozen rest from `model.base`: a few MB of LoRA instead of a 3.4 GB SD 1.5 U-Net. The
    metadata marks such a file and holds a probe of the frozen weights for `load_networks`.
    """
    frozen = _frozen_names(network)
    skip = set(frozen)
    # clone(): safetensors refuses tensors that share storage (tied weights).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items() if k not in skip}
    if not frozen:
        return tensors, {}
    return tensors, {CONTENTS: TRAINABLE_ONLY, PROBE: json.dumps(_probe(network, frozen))}


def _check_trainable_only(path: Path, network: torch.nn.Module, tensors: dict[str, torch.Tensor],
                          metadata: dict[str, str]) -> None:
    """A trainable-only file must hold every trainable weight and fit the frozen weights it was trained with."""
    trainable = {n for n, p in network.named_parameters(remove_duplicate=False) if p.requires_grad}
    current = network.state_dict()
    missing, unknown = sorted(trainable - tensors.keys()), sorted(tensors.keys() - current.keys())
    reshaped = sorted(k for k, v in tensors.items() if k in current and v.shape != current[k].shape)
    if missing or unknown or reshaped:
        what = [f"{len(missing)} trainable weight(s) missing (e.g. {', '.join(missing[:3])})"] if missing else []
        what += [f"{len(unknown)} unknown key(s) (e.g. {', '.join(unknown[:3])})"] if unknown else []
        what += [f"{len(reshaped)} of another shape (e.g. {', '.join(reshaped[:3])})"] if reshaped else []
        raise GenlabError(f"{path} does not fit the network built from the run's config: {'; '.join(what)}. "
                          "Was the model config changed (a LoRA rank, its targets)? Use the one the run was trained with.")
    frozen = _frozen_names(network)
    saved = json.loads(metadata.get(PROBE, "[]"))
    now = _probe(network, frozen) if len(saved) == len(frozen) else []
    # fp16/bf16 copies of the frozen base (mixed precision) agree to ~0.4%; another base does not.
    differ = [n for n, a, b in zip(frozen, now, saved)
              if len(a) != len(b) or any(abs(x - y) > 1e-2 * abs(y) + 1e-3 for x, y in zip(a, b))]
    if len(saved) != len(frozen) or differ:
        detail = f"e.g. {', '.join(differ[:2])}" if differ else f"{len(frozen)} frozen tensors, {len(saved)} saved"
        raise GenlabError(f"{path} holds only trainable weights; the frozen rest is rebuilt from the run's config "
                          f"(model.base), but it differs from the weights trained on ({detail}). Point model.base in "
                          "the run's .hydra/config.yaml at the original base.")


def load_networks(ckpt: Path, networks: dict[str, torch.nn.Module]) -> None:
    """Load each network's weights from `ckpt` in place.

    A trainable-only file (see `network_state`) loads onto the frozen weights the family
    built, after checking that it has every trainable key and that the base matches.
    """
    for name, network in networks.items():
        path = ckpt / f"{name}.safetensors"
        try:
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as error:  # safetensors raises its own error type for a damaged header
            raise CheckpointCorrupt(f"{path} cannot be read ({_first_line(error)})") from None
        if metadata.get(CONTENTS) == TRAINABLE_ONLY:
            _check_trainable_only(path, network, tensors, metadata)
            network.load_state_dict(tensors, strict=False)
        else:
            network.load_state_dict(tensors)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_file_of(ckpt: Path, filename: str, trust_run: bool = False) -> Any:
    """A torch-saved file of a checkpoint (tensors and plain values only), or None if it has none.

    Args:
        trust_run: also allow the numpy RNG state that runs written before genlab 0.2 stored
            (`OLD_RUN_GLOBALS`, still with `weights_only=True`: never an arbitrary object).

    Raises:
        UnsafeCheckpoint: the file needs other objects (an old run without `trust_run`, or a
            file genlab did not write).
        CheckpointCorrupt: the file cannot be read at all.
    """
    path = ckpt / filename
    if not path.exists():
        return None
    try:
        if trust_run:
            with torch.serialization.safe_globals([_global(name) for name in OLD_RUN_GLOBALS if _global(name)]):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        needs = re.search(r"GLOBAL ([\w.]+)", str(error))
        needs = needs.group(1) if needs else "an object type"
        if not trust_run and needs.startswith("numpy"):
            raise UnsafeCheckpoint(
                f"{path} was written by genlab before 0.2 and holds numpy state that safe loading refuses; "
                "if you trust where this run came from, add --trust-run (it allows numpy arrays, nothing else).") from None
        raise UnsafeCheckpoint(f"{path} holds {needs}, which genlab never writes; it was not loaded "
                               "(a checkpoint from an unknown source can run code when unpickled).") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointCorrupt(f"{path} cannot be read ({_first_line(error)})") from None


def _global(dotted: str) -> Any:
    """The object a pickle GLOBAL names, or None where this numpy has no such name."""
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def load_state(ckpt: Path) -> dict[str, Any]:
    """The state.json of a checkpoint (step, data position, W&B id, ...)."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointCorrupt(f"{ckpt / 'state.json'} cannot be read ({_first_line(error)})") from None
    return state


def newest_loadable(candidates: list[Path], load: Any) -> tuple[Path, Any]:
    """`(checkpoint, load(checkpoint))` for the newest of `candidates` that loads.

    A damaged newest checkpoint (see `CheckpointCorrupt`) is skipped with a warning naming it,
    as one without its COMPLETE marker is; the previous complete one is used instead.
    """
    for path in reversed(candidates):
        try:
            return path, load(path)
        except CheckpointCorrupt as error:
            log.warning("skipping damaged checkpoint %s: %s", path, error)
    raise CheckpointCorrupt(f"no checkpoint of {candidates[0].parent} can be read; "
                            "restore the run from a copy (or train again).")
