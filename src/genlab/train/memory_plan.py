"""What one process holds for training: measured (`held_bytes`) and planned before training (`plan`).

Per process, for a network with P trainable and F frozen parameters (4 bytes each in fp32) on N
processes, AdamW (two states of the parameter's size):

| strategy | parameters      | gradients | optimizer states | EMA    |
|----------|-----------------|-----------|------------------|--------|
| ddp      | (P + F) x 4     | P x 4     | 2 P x 4          | P x 4  |
| fsdp     | (P + F) x 4 / N | P x 4 / N | 2 P x 4 / N      | P x 4 / N |

Frozen parts are held in the weight dtype of trainer.mixed_precision (2 bytes under bf16/fp16).
FSDP adds, during a forward or backward, the gathered weights of the block being computed (and,
with reshard_after_forward=false, of every block until its backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor: this process's shard


def _bytes(tensors: Any) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        local = _local(t)
        key = (local.device, local.data_ptr(), local.numel())
        if key not in seen or not local.numel():  # a tied weight counts once
            seen.add(key)
            total += local.numel() * local.element_size()
    return total


def held_bytes(networks: dict[str, nn.Module], optimizers: dict[str, Any], ema: Any = None,
               frozen: dict[str, nn.Module] | None = None) -> dict[str, int]:
    """Bytes this process holds in tensors now: parameters (trainable networks, plus `frozen` ones),
    gradients, optimizer states and EMA weights. Under strategy=fsdp, each DTensor's local shard."""
    modules = [*networks.values(), *(frozen or {}).values()]
    params = [p for m in modules for p in m.parameters()]
    states = [v for o in optimizers.values() for s in getattr(o, "optimizer", o).state.values() for v in s.values()
              if torch.is_tensor(v) and v.dim() > 0]  # Adam's step counters are scalars: left out
    return {"params": _bytes(params), "grads": _bytes(p.grad for p in params),
            "optimizer": _bytes(states), "ema": _bytes(ema.shadow_params) if ema is not None else 0}
