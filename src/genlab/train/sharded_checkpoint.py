"""Sharded checkpoints of `strategy=fsdp` runs: torch.distributed.checkpoint (DCP), still complete-or-ignored.

Layout of `checkpoints/step_000500/`:
    __0_0.distcp, __1_0.distcp, ...   each process's shards of the trainable weights, the optimizer
                                      states and the EMA weights (one file per process)
    .metadata                         DCP's index: which bytes of which file hold which slice of each tensor
    training_state.pt                 LR schedules, grad scaler, RNG, log window, EMA's counters
    state.json                        step, data position, ... ("format": "dcp")
    COMPLETE                          written last

The folder's life is `train/checkpoint.py`'s: every process writes its shards into one
`.step_000500.<pid of rank 0>.tmp/`, DCP's coordinator (rank 0) writes `.metadata` once all shards are
written, then rank 0 writes the rest, fsyncs, writes COMPLETE and renames (`checkpoint.seal`). A kill
at any moment leaves the previous checkpoint as the newest complete one.

Tensors are keyed by name (`<network>.<parameter>`), not by position, so a checkpoint loads on any
number of processes: DCP reads each process's slice of every tensor from whichever files hold it
(resharding), and one process without a process group gets whole tensors (`full_weights`).

Safe loading: DCP unpickles `.metadata` and the non-tensor items (optimizer param groups) with
plain pickle; genlab reads them with an allowlist of DCP's own metadata classes and with
`torch.load(weights_only=True)` instead, so a checkpoint from anywhere cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from genlab.errors import GenlabError
from genlab.train import checkpoint as ckpt

METADATA = ".metadata"  # DCP's index file (torch.distributed.checkpoint.filesystem._metadata_fn)
#: What `.metadata` may name: DCP's metadata classes, torch.Size, dtypes and layouts. Nothing callable beyond these.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
#: Trainable weights only: the frozen rest (a base under LoRA) is rebuilt from model.base, as in checkpoint.py.
TRAINABLE = StateDictOptions(ignore_frozen_params=True)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise ckpt.UnsafeCheckpoint(f"holds {module}.{name}, which DCP's metadata never holds")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` unpickled through an allowlist (DCP's own uses pickle.load)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / METADATA
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except ckpt.UnsafeCheckpoint as error:
            raise ckpt.UnsafeCheckpoint(f"{path} {error}; it was not loaded (a checkpoint from an unknown "
                                        "source can run code when unpickled).") from None
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as error:
            raise ckpt.CheckpointCorrupt(f"{path} cannot be read ({type(error).__name__}: {error})") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with non-tensor items (param groups: floats, tuples, strings) read by
    `torch.load(weights_only=True)`; DCP's own reads them with weights_only=False."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise ckpt.UnsafeCheckpoint(f"a non-tensor item {read_item.dest_index.fqn} needs objects beyond plain "
                                        f"values ({str(error).splitlines()[0]}); it was not loaded.") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer


def _tensors(networks: dict[str, nn.Module], optimizers: dict[str, Any], ema: Any,
             ema_network: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """(one module holding every network, the state DCP saves or loads in place), keyed by name."""
    model = nn.ModuleDict(networks)  # one module: a phase's param groups may span networks (ControlNet + LoRA)
    state: dict[str, Any] = {"networks": get_model_state_dict(model, options=TRAINABLE),
                             "optimizers": {k: get_optimizer_state_dict(model, _inner(o), options=TRAINABLE)
                                            for k, o in optimizers.items()}}
    if ema is not None:
        names = [n for n, _ in networks[ema_network].named_parameters()]
        state["ema"] = dict(zip(names, ema.shadow_params, strict=True))
    return model, state


def save(root: Path, step: int, networks: dict[str, nn.Module], optimizers: dict[str, Any], ema: Any,
         ema_network: str | None, extra: dict[str, Any], state: dict[str, Any], keep: int | None,
         name: str | None = None) -> Path | None:
    """Every process writes its shards; rank 0 writes the rest and seals the folder (COMPLETE last).

    A collective: every process calls it. Returns the checkpoint on rank 0, None elsewhere.
    Raises CheckpointWriteError on every process when the save failed (the previous checkpoint is intact).
    """
    main = dist.get_rank() == 0
    final = root / (name or f"step_{step:06d}")
    tmp = [root / f".{final.name}.{os.getpid()}.tmp" if main else None]
    dist.broadcast_object_list(tmp, src=0)  # one folder for all: rank 0's pid names it, as prune expects
    tmp = tmp[0]
    problem = None
    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as error:
            problem = error
    problem = _agreed(problem, root, final, tmp)
    _, tensors = _tensors(networks, optimizers, ema, ema_network)
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True))
    except Exception as error:  # noqa: BLE001  DCP gathers every rank's failure into one CheckpointException
        problem = error
    if main and problem is None:
        try:
            rest = ema.state_dict() if ema is not None else None
            if rest is not None:
                rest = {k: v for k, v in rest.items() if k != "shadow_params"}
            torch.save({**extra, "ema": rest}, tmp / "training_state.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "format": "dcp"}, indent=2))
            ckpt.seal(root, final, tmp, step)
        except (OSError, RuntimeError) as error:
            problem = error
    problem = _agreed(problem, root, final, tmp)
    if main:
        ckpt.prune(root, keep)
    dist.barrier()
    return final if main else None


def _agreed(problem: BaseException | None, root: Path, final: Path, tmp: Path) -> None:
    """Every process learns whether any failed, and raises the same CheckpointWriteError if so."""
    message = [str(ckpt.write_failed(root, final, tmp, problem)) if problem is not None else None]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, message[0])
    failed = next((m for m in every if m), None)
    if failed:
        raise ckpt.CheckpointWriteError(failed)
    return None


def is_sharded(path: Path) -> bool:
    """Whether checkpoint `path` was written by strategy=fsdp (DCP shards) rather than as safetensors."""
    return (Path(path) / METADATA).exists()


def load(path: Path, networks: dict[str, nn.Module], optimizers: dict[str, Any], ema: Any,
         ema_network: str | None, trust_run: bool) -> dict[str, Any]:
    """Load this process's slices of weights, optimizer and EMA states in place; returns the training state.

    A collective. Works on any number of processes (DCP reshards); a safetensors checkpoint of a
    `strategy=ddp` run is refused with what to do.
    """
    if not is_sharded(path):
        raise GenlabError(f"{path} was written by strategy=ddp (safetensors, no DCP {METADATA}); resume this run with "
                          "strategy=ddp, or start a new strategy=fsdp run from its export.")
    training_state = ckpt.load_file_of(path, "training_state.pt", trust_run)
    if training_state is None:
        raise ckpt.CheckpointCorrupt(f"{path} has no training_state.pt")
    _check_shards(path)
    model, tensors = _tensors(networks, optimizers, ema, ema_network)
    try:
        dcp.load(tensors, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
    except (ckpt.UnsafeCheckpoint, ckpt.CheckpointCorrupt):
        raise
    except (Exception, CheckpointException) as error:  # noqa: BLE001  DCP gathers every rank's failure
        raise ckpt.CheckpointCorrupt(f"{path} cannot be loaded ({_last_line(error)})") from None
    set_model_state_dict(model, tensors["networks"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    for k, o in optimizers.items():
        set_optimizer_state_dict(model, _inner(o), tensors["optimizers"][k], options=TRAINABLE)
    if ema is not None:
        ema.load_state_dict({**training_state["ema"], "shadow_params": ema.shadow_params})
    return training_state


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _check_shards(path: Path) -> None:
    """Every shard file the metadata names is there (a copy that lost one is damaged, not half-loadable)."""
    files = {info.relative_path for info in SafeReader(path).read_metadata().storage_data.values()}
    missing = sorted(f for f in files if not (Path(path) / f).is_file())
    if missing:
        raise ckpt.CheckpointCorrupt(f"{path} lacks {len(missing)} of its {len(files)} shard files ({', '.join(missing[:3])})")


def full_weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Whole trainable weights per network from a sharded checkpoint, in one process with no process
    group (`genlab sample --checkpoint`, exports of old steps): {network: {parameter: tensor}}."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _check_shards(path)
    metadata = SafeReader(path).read_metadata()
    wanted = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in metadata.state_dict_metadata.items()
              if k.startswith("networks.") and isinstance(v, TensorStorageMetadata)}
    dcp.load(wanted, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=True)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in wanted.items():
        network, _, name = key.removeprefix("networks.").partition(".")
        out.setdefault(network, {})[name] = tensor
    return out
