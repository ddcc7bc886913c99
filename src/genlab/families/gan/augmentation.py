"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to real and fake images alike,
every draw from the step's `StepRandom`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genlab.step_random import StepRandom


def _color(x: torch.Tensor, rng: StepRandom) -> torch.Tensor:
    r = lambda: rng.rand(x.shape[0], 1, 1, 1).to(x.device, x.dtype)  # noqa: E731
    x = x + (r() - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r() * 2) + mean  # saturation (a no-op on grey images)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r() + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, rng: StepRandom, ratio: float = 0.125, padding: str = "reflection") -> torch.Tensor:
    """Shift each image by up to `ratio` of its side; `padding` fills the uncovered strip (a grid_sample mode).

    "zeros" (DiffAugment's original) fills with 0, mid-grey in [-1, 1], a value no digit's
    background has; "reflection" (as StyleGAN2-ADA pads) mirrors the image's own border. On
    digits the padding alone did not cause the GAN's border blocks (docs/evaluation.md, GAN artifacts).
    """
    b, _, h, w = x.shape
    most = int(h * ratio + 0.5)
    shift = torch.stack([rng.randint(2 * most + 1, b), rng.randint(2 * most + 1, b)], 1).to(x.device, x.dtype) - most
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = shift[:, 0] * 2 / w, shift[:, 1] * 2 / h  # whole-pixel shifts
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode=padding, align_corners=False)


def _cutout(x: torch.Tensor, rng: StepRandom, ratio: float = 0.5) -> torch.Tensor:
    """Zero a random square of half the side (0: mid-grey in [-1, 1])."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = rng.randint(h + (1 - ch % 2), b).view(b, 1, 1).to(x.device) - ch // 2
    left = rng.randint(w + (1 - cw % 2), b).view(b, 1, 1).to(x.device) - cw // 2
    ys, xs = torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]
    hole = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)  # (B, H, W)
    return x * (~hole)[:, None].to(x.dtype)


AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}


PADDINGS = ("reflection", "zeros", "border")


def diff_augment(x: torch.Tensor, policy: list[str], rng: StepRandom, padding: str = "reflection") -> torch.Tensor:
    """`policy`'s augmentations in order; `padding` is how translation fills what it uncovers."""
    for name in policy:
        x = _translation(x, rng, padding=padding) if name == "translation" else AUGMENTS[name](x, rng)
    return x
