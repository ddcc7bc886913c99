"""Helpers around `family.sample`: EMA weights, unwrapped networks and image grids."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:  # only a type here; importing diffusers costs seconds of start-up
    from diffusers.training_utils import EMAModel


@contextlib.contextmanager
def unwrapped_networks(family, accelerator) -> Iterator[None]:
    """Temporarily give the family its bare networks (no DDP / compile wrappers).

    Sampling happens on the main process only; a DDP wrapper's forward could wait for
    the other processes (buffer broadcast) and hang.
    """
    wrapped = family.networks()
    for name, network in wrapped.items():
        setattr(family, name, accelerator.unwrap_model(network))
    try:
        yield
    finally:
        for name, network in wrapped.items():
            setattr(family, name, network)


@contextlib.contextmanager
def swapped_in_ema(family, ema: EMAModel | None) -> Iterator[None]:
    """Temporarily load the EMA weights into the family's EMA network (and eval mode)."""
    networks = family.networks()
    was_training = {n: m.training for n, m in networks.items()}
    for m in networks.values():
        m.eval()
    params = list(getattr(family, family.ema_network).parameters()) if ema is not None else None
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        yield
    finally:
        if ema is not None:
            ema.restore(params)
        for n, m in networks.items():
            m.train(was_training[n])


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Save images (N, C, H, W) in [-1, 1] as one PNG grid (about square)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    from torchvision.utils import save_image  # here: importing torchvision takes seconds (it loads torch._dynamo)

    save_image((images.float().clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=1, pad_value=0.5)
    return path
