"""How the networks are spread over processes: `strategy=ddp` (replicate) or `strategy=fsdp` (shard).

The loop builds one strategy from `cfg.strategy` and asks it four things: wrap each network,
save and load a checkpoint, and write the export. It never asks which strategy it holds.

- `DDP` is Accelerate's `prepare`: every process keeps the whole model, its gradients and its
  optimizer states; checkpoints are safetensors written by the main process
  (`train/checkpoint.py`).
- `FSDP` is PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`): each process keeps 1/N of
  every parameter, gradient and optimizer state (EMA too), all-gathered one block at a time
  for the forward and backward. Checkpoints are torch.distributed.checkpoint shards
  (`train/sharded_checkpoint.py`), written by every process.

Why `fully_shard` is called here and not through Accelerate's FSDP plugin (accelerate 1.16,
checked): on CPU processes (gloo) Accelerate ignores `fsdp_plugin` and wraps the model in DDP
without a word, and its FSDP2 `prepare` takes one model together with its optimizer, while a
genlab family has several networks and optimizers whose param groups may span networks
(ControlNet + the U-Net's LoRA; the GAN's D and G). Accelerate still runs the rest: the process
group, autocast, backward, reduce. The FSDP2 options are those of Accelerate's plugin
(`reshard_after_forward`, a `MixedPrecisionPolicy`, a `CPUOffloadPolicy`, activation
checkpointing, hybrid shard), with the same meaning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from torch import nn

from genlab.errors import ConfigError, GenlabError

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEAD_PEER = ("another process of this run stopped or stopped answering ({what}); this process stops too. Read the "
             "other node's or process's log, then resume the run (`genlab resume RUN_DIR`, on every node).")


def process_group_kwargs(timeout_s: float) -> list[Any]:
    """Accelerate's handler giving the process group a timeout: a collective that waits longer for a
    process that hangs (or whose machine vanished) fails instead of waiting forever. A process that
    dies closes its sockets, which its peers see at once, long before the timeout."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]


DOUBLE_BACKWARD = ("strategy=fsdp cannot differentiate twice through a sharded network (a gradient penalty such as "
                   "model.r1_gamma or model.r2_gamma: FSDP2 frees the gathered weights after the first backward); set "
                   "the penalty to 0 or train with strategy=ddp.")


def explain_failure(error: BaseException) -> str | None:
    """The sentence for a failure of the processes or of sharding that torch reports as a traceback, or None."""
    if is_dead_peer(error):
        return DEAD_PEER.format(what=str(error).splitlines()[0][:200])
    if isinstance(error, RuntimeError) and "data is not allocated yet" in str(error):
        return DOUBLE_BACKWARD  # autograd.grad(create_graph=True) then backward through a resharded block
    return None


def is_dead_peer(error: BaseException) -> bool:
    """A collective failed because another process is gone (gloo/NCCL errors, a timed-out wait)."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(w in str(error) for w in ("Connection closed by peer", "Gloo", "NCCL",
                                                                           "Connection reset by peer", "Timed out")))


def shard_units(family: Any) -> dict[str, list[nn.Module]]:
    """What the family asks to shard block by block (families.base.Sharded); {} when it declares nothing."""
    from genlab.families.contract import Sharded

    return family.shard_units() if isinstance(family, Sharded) else {}


class DDP:
    """Every process holds the whole model (today's behaviour; the default).

    Cheapest in communication: one gradient all-reduce per step. Memory per GPU:
    params + grads + optimizer states + EMA of the whole model.
    """

    sharded = False  # a forward needs no other process: sampling and eval run on the main process alone

    def __init__(self, timeout_s: float = 600):
        self.timeout_s = timeout_s

    def setup(self, accelerator: Accelerator, mixed_precision: str) -> None:
        self.accelerator = accelerator

    def wrap(self, network: nn.Module, units: list[nn.Module]) -> nn.Module:
        return self.accelerator.prepare(network)

    def wrap_frozen(self, family: Any) -> None:
        """Frozen bases stay whole on every process."""

    def no_sync(self, network: nn.Module) -> Any:
        """No gradient all-reduce in this micro-step (all but the last of grad_accum)."""
        return self.accelerator.no_sync(network)

    def save_checkpoint(self, root: Path, step: int, networks: dict[str, nn.Module],
                        optimizers: dict[str, Any], ema: Any, ema_network: str | None, extra: dict[str, Any],
                        state: dict[str, Any], keep: int | None, name: str | None = None) -> Path | None:
        """The main process writes safetensors + training_state.pt (train/checkpoint.py); others return None."""
        from genlab.train import checkpoint as ckpt

        if not self.accelerator.is_main_process:
            return None
        training_state = {**extra, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}
        files = {"training_state.pt": training_state, "ema.pt": ema.state_dict() if ema is not None else None}
        return ckpt.save_checkpoint(root, step, networks, files, state, keep, name=name)

    def load_checkpoint(self, path: Path, networks: dict[str, nn.Module], optimizers: dict[str, Any], ema: Any,
                        ema_network: str | None, trust_run: bool) -> dict[str, Any]:
        """Load weights, optimizer and EMA states in place; returns the rest of the training state."""
        from genlab.train import checkpoint as ckpt
        from genlab.train.sharded_checkpoint import is_sharded

        if is_sharded(path):
            raise GenlabError(f"{path} was written by strategy=fsdp (DCP shards); resume this run with strategy=fsdp.")
        training_state = ckpt.load_file_of(path, "training_state.pt", trust_run)
        if training_state is None:
            raise ckpt.CheckpointCorrupt(f"{path} has no training_state.pt")
        ckpt.load_networks(path, networks)
        for k, o in optimizers.items():
            o.load_state_dict(training_state["optimizers"][k])
        if ema:
            ema.load_state_dict(ckpt.load_file_of(path, "ema.pt", trust_run))
        return training_state

    def export(self, family: Any, rebuild: Callable[[], Any], out_dir: Path) -> None:
        """The main process exports the family as it is (EMA swapped in and networks unwrapped by the caller)."""
        if self.accelerator.is_main_process:
            family.export(out_dir)


class FSDP:
    """FSDP2: parameters, gradients, optimizer states and EMA split over the processes.

    Args:
        reshard_after_forward: free each block's gathered weights after its forward (full shard,
            ZeRO-3); False keeps them until the backward (ZeRO-2-like: more memory, one all-gather
            less per block).
        hybrid: shard inside a node and replicate across nodes (HSDP): all-gathers stay on the
            node's fast links; memory falls with the GPUs of one node, not of all nodes.
        param_dtype: the dtype blocks compute in (gathered weights); null: trainer.mixed_precision's.
        reduce_dtype: the dtype gradients are reduced in (fp32 keeps bf16 runs' sums exact enough).
        cpu_offload: keep the sharded parameters, gradients and optimizer states in host memory
            (the optimizer steps on the CPU); slow, for bases that do not fit otherwise.
        activation_checkpointing: recompute each block's activations in the backward instead of
            keeping them (about a third more compute, activations of one block instead of all).
        timeout_s: how long a collective waits for a process that does not answer before failing.
    """

    sharded = True  # a forward all-gathers: every process samples (and diagnoses) with the main one

    def __init__(self, reshard_after_forward: bool = True, hybrid: bool = False, param_dtype: str | None = None,
                 reduce_dtype: str = "fp32", cpu_offload: bool = False, activation_checkpointing: bool = False,
                 timeout_s: float = 600):
        if param_dtype is not None and param_dtype not in DTYPES:
            raise ConfigError(f"strategy.param_dtype={param_dtype!r}: use null, {', '.join(DTYPES)}")
        if reduce_dtype not in DTYPES:
            raise ConfigError(f"strategy.reduce_dtype={reduce_dtype!r}: use {', '.join(DTYPES)}")
        self.reshard_after_forward, self.hybrid = reshard_after_forward, hybrid
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.cpu_offload, self.activation_checkpointing = cpu_offload, activation_checkpointing
        self.timeout_s = timeout_s

    def setup(self, accelerator: Accelerator, mixed_precision: str) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        self.accelerator = accelerator
        if not dist.is_initialized():  # one process: a group of one, so a run resumes on any number of processes
            dist.init_process_group("gloo" if accelerator.device.type == "cpu" else "nccl",
                                    store=dist.HashStore(), rank=0, world_size=1)
        world = dist.get_world_size()
        device = accelerator.device.type
        if self.hybrid:
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            if world % per_node:
                raise ConfigError(f"strategy.hybrid=true needs the same number of processes on every node "
                                  f"({world} processes, {per_node} on this node)")
            self.mesh = init_device_mesh(device, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))
        else:
            self.mesh = init_device_mesh(device, (world,), mesh_dim_names=("shard",))
        param = self.param_dtype or {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision)
        self.options = {
            "mesh": self.mesh, "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(param_dtype=DTYPES[param] if param else None,
                                              reduce_dtype=DTYPES[self.reduce_dtype]),
        }
        if self.cpu_offload:
            self.options["offload_policy"] = CPUOffloadPolicy()

    def _shard(self, module: nn.Module, units: list[nn.Module]) -> nn.Module:
        import torch.distributed as dist
        from torch.distributed._composable import checkpoint
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        if isinstance(module, FSDPModule):
            return module
        # Each process built its own random initial weights (seeds are per process); DDP broadcasts rank 0's
        # when it wraps, FSDP2 keeps whatever each holds: give every process rank 0's before sharding.
        if dist.get_world_size() > 1:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)
        for unit in units:  # innermost first: each block gathers its own weights only
            if self.activation_checkpointing:
                checkpoint(unit)
            fully_shard(unit, **self.options)
        # The root keeps what no block holds (embeddings, the head); frozen weights are sharded the same way.
        fully_shard(module, **self.options)
        for method in ("encode", "decode"):  # a VAE is called through these, not forward: gather for them too
            if callable(getattr(module, method, None)):
                register_fsdp_forward_method(module, method)
        return module

    def wrap(self, network: nn.Module, units: list[nn.Module]) -> nn.Module:
        return self._shard(network, units)

    def wrap_frozen(self, family: Any) -> None:
        """Frozen bases the family names in `shard_units` (a VAE, a text encoder, a full ControlNet's U-Net)
        are sharded too: a 20B frozen base is split over the GPUs instead of copied to each."""
        trained = family.networks()
        for name, units in shard_units(family).items():
            module = getattr(family, name, None)
            if name not in trained and isinstance(module, nn.Module):
                setattr(family, name, self._shard(module, units))

    def no_sync(self, network: nn.Module) -> Any:
        """Keep this micro-step's gradients unreduced (all but the last of grad_accum): one reduce-scatter per step."""
        import contextlib

        @contextlib.contextmanager
        def unsynced():
            network.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                network.set_requires_gradient_sync(True)

        return unsynced()

    def save_checkpoint(self, root: Path, step: int, networks: dict[str, nn.Module],
                        optimizers: dict[str, Any], ema: Any, ema_network: str | None, extra: dict[str, Any],
                        state: dict[str, Any], keep: int | None, name: str | None = None) -> Path | None:
        """Every process writes its shards; the main process seals the folder (COMPLETE last)."""
        from genlab.train import sharded_checkpoint

        return sharded_checkpoint.save(root, step, networks, optimizers, ema, ema_network, extra, state, keep, name)

    def load_checkpoint(self, path: Path, networks: dict[str, nn.Module], optimizers: dict[str, Any], ema: Any,
                        ema_network: str | None, trust_run: bool) -> dict[str, Any]:
        from genlab.train import sharded_checkpoint

        return sharded_checkpoint.load(path, networks, optimizers, ema, ema_network, trust_run)

    def export(self, family: Any, rebuild: Callable[[], Any], out_dir: Path) -> None:
        """Gather each network's full weights onto the main process's host memory (a collective), load
        them into a freshly built, unsharded family there, and export that: the ecosystem's format."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = {n: get_model_state_dict(m, options=full) for n, m in family.networks().items()}
        if not self.accelerator.is_main_process:
            return
        plain = rebuild()  # on the CPU, fp32: what a strategy=ddp run exports
        for name, state in weights.items():
            getattr(plain, name).load_state_dict(state)
        plain.export(out_dir)


def build_strategy(cfg: Any) -> DDP | FSDP:
    """The strategy of `cfg.strategy` (runs saved before the group existed: DDP)."""
    from hydra.utils import instantiate

    node = cfg.get("strategy") if hasattr(cfg, "get") else None
    return instantiate(node) if node is not None else DDP()
