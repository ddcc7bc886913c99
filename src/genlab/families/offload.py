"""Group offloading of the frozen denoiser: the memory lever of `model.offload_base`.

A ControlNet trains beside a frozen base denoiser that only runs forward (and passes gradients
through to the ControlNet's residuals). diffusers' group offloading keeps that denoiser's weights
in host memory, one block at a time moved to the accelerator for its forward (on a GPU the copies
overlap compute on a CUDA stream), so the GPU holds the ControlNet and about one block of the
base instead of all of it: what a 12-20B base needs on a 24 GB card. On a CPU it changes nothing
but the path the weights take (the tests check it gives the same loss and gradients).

Not offered: diffusers' `offload_to_disk_path` (weights streamed from files). Measured here, the
gradients that reach the ControlNet through a disk-offloaded base are wrong (the weights a
block's backward needs are gone by then), while the loss is right. And only a denoiser without
trainable weights is offloaded: a group is reloaded from its offloaded copy at every forward,
which would undo a LoRA's updates.
"""

from __future__ import annotations

import torch
from torch import nn

from genlab.errors import ConfigError

MODES = ("cpu",)


def check(mode: str | None, lora_rank: int, quantize_base: str | None, denoiser: str = "U-Net") -> None:
    """Refuse in one sentence what group offloading cannot do."""
    if mode is None:
        return
    if mode not in MODES:
        raise ConfigError(f"model.offload_base={mode!r}: use null or cpu (disk offloading breaks the gradients that "
                          "pass through the base).")
    if lora_rank > 0:
        raise ConfigError(f"model.offload_base={mode} reloads the frozen {denoiser}'s weights at every forward, which "
                          "would undo its LoRA's updates: set model.lora.rank=0 (the ControlNet alone) or "
                          "model.offload_base=null.")
    if quantize_base:
        raise ConfigError(f"model.offload_base={mode} and model.quantize_base={quantize_base} are two answers to "
                          f"the same problem, and genlab does not combine them: choose one.")


def is_offloaded(module: nn.Module) -> bool:
    return bool(getattr(module, "_genlab_offload", None))


def offload_frozen(module: nn.Module, mode: str | None, device: torch.device) -> None:
    """Turn on diffusers' block-level group offloading of `module` towards `device` (once; `mode` None: nothing)."""
    if mode is None or is_offloaded(module):
        return
    module.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                                num_blocks_per_group=1, use_stream=device.type == "cuda")
    module._genlab_offload = mode
