"""The contract between the generic training loop and a model family.

A family (DDPM, VAE, GAN, SD, ControlNet) is one plain class in its own file that owns
its networks, its losses and its sampling. The loop in `genlab.train.loop` only ever
talks to it through the `Family` protocol below, so adding a family never touches the
loop: write `families/<name>.py` and `configs/model/<name>.yaml` (with `_target_`
pointing at the class), nothing else.

How the loop drives a family, per optimizer step `step` (0-based):

    for phase in family.phases(step):                  # e.g. ["d", "g"] for a GAN
        for each of trainer.grad_accum micro-batches:
            loss, logs = family.loss(phase, batch, step)   # under autocast
            accelerator.backward(loss / grad_accum)
        clip grads of param_groups()[phase]; stop on non-finite grads
        optimizers[phase].step(); lr_schedules[phase].step(); zero_grad
    EMA update of family.ema_network (if trainer.ema)

Batches are dicts: "image" (B, C, H, W) float in [-1, 1]; optionally "label" (B,) long,
"caption" list[str], "sketch" (B, C, H, W) float in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from genlab.errors import GenlabError  # noqa: F401  (families raise it)


@runtime_checkable
class Family(Protocol):
    """What the training loop, `genlab sample` and `genlab eval` need from a family."""

    #: attribute name (a key of `networks()`) whose weights get an EMA copy, or None.
    ema_network: str | None

    def networks(self) -> dict[str, nn.Module]:
        """Trainable networks by attribute name.

        These are checkpointed (`<name>.safetensors`) and wrapped by Accelerate: the loop
        replaces `family.<name>` with the prepared module, so `loss` must read the
        attribute each call rather than keep its own reference. Frozen parts (a VAE or a
        text encoder) are not listed here; the family moves them in `to()`.

        A listed network may be partly frozen (a pretrained U-Net under LoRA): its
        parameters with `requires_grad=False` are left out of checkpoints, so the
        constructor must rebuild them identically from config (e.g. from `model.base`).
        """

    def param_groups(self) -> dict[str, list[dict[str, Any]]]:
        """One entry per optimizer, keyed by phase name.

        Each value is a list of torch param-group dicts ({"params": [...], ...}); an
        optional "lr_scale" key multiplies `trainer.lr` for that group (TTUR for GANs).
        """

    def phases(self, step: int) -> list[str]:
        """Phase (optimizer) names to update, in order, at optimizer step `step`.

        Each phase consumes `trainer.grad_accum` micro-batches and steps its optimizer.
        """

    def loss(self, phase: str, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss for `phase` on one micro-batch, plus detached scalars to log.

        Log names should say what they are (`loss`, `g_loss`, `d_real`, `kl`, ...). Never
        call `.item()` here: the loop syncs with the device only at log steps.
        """

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "Family":
        """Move every network (trainable and frozen) to `device`.

        `dtype` is the weight dtype for *frozen* networks under mixed precision;
        trainable networks stay fp32.
        """

    @torch.no_grad()
    def sample(self, n: int, seed: int, **options: Any) -> torch.Tensor:
        """Generate `n` images, (n, C, H, W) in [-1, 1], deterministically from `seed`.

        `options` are family-specific (`sampler`, `steps`, `class_label`, `guidance`,
        `sketch`, `prompt`, `interpolate`, `images`...). Raise `GenlabError` naming the
        option when one does not apply to the family.
        """

    def export(self, out_dir: Path) -> None:
        """Write the trained model in its ecosystem's format (see DESIGN.md)."""


def batch_labels(batch: dict[str, Any], num_classes: int | None) -> torch.Tensor | None:
    """The batch's class labels for a conditional model (None when `num_classes` is unset)."""
    if not num_classes:
        return None
    if "label" not in batch:
        raise GenlabError("model.conditional=true but the batches have no 'label'; use labelled data")
    return batch["label"]


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def unwrap(module: nn.Module) -> nn.Module:
    """The bare model under Accelerate/DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while isinstance(inner := getattr(module, "module", None) or getattr(module, "_orig_mod", None), nn.Module):
        module = inner
    return module


def single_optimizer(networks: dict[str, nn.Module]) -> dict[str, list[dict[str, Any]]]:
    """`param_groups()` of a one-phase family: every trainable parameter of `networks` in one group."""
    return {"main": [{"params": [p for net in networks.values() for p in net.parameters() if p.requires_grad]}]}
