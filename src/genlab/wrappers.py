"""The bare network under its wrappers: one helper for every layer that needs it.

Accelerate and DDP wrap a network as `.module`, torch.compile as `._orig_mod`, in either order
(genlab compiles before Accelerate prepares). Families (`families.contract`) and the latent cache
(`data.latent_cache`, which keys cached text embeddings by the encoder's weights) both unwrap.
"""

from __future__ import annotations

from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The bare model under Accelerate/DDP (`.module`) and torch.compile (`._orig_mod`) wrappers.

    No truth test on a module on the way: a compiled one answers `bool()` with its inner module's
    `__len__`, which a Linear lacks.
    """
    while True:
        inner = getattr(module, "_orig_mod", None)
        inner = getattr(module, "module", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return module
        module = inner
