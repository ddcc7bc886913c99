"""The GAN's losses, logits in and a scalar out, and the gradient penalties: small functions, checked by hand
in tests/test_gan.py."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def d_loss_nonsaturating(real: torch.Tensor, fake: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """BCE on real (target `real_target`, < 1 for one-sided label smoothing) plus BCE on fake (target 0)."""
    return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_target))
            + F.softplus(fake).mean())


def g_loss_nonsaturating(fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake).mean()  # -log sigmoid(D(G(z)))


def d_loss_hinge(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def g_loss_hinge(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def d_loss_wgan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return fake.mean() - real.mean()


g_loss_wgan = g_loss_hinge  # both maximise the critic's score of fakes


def d_loss_lsgan(real: torch.Tensor, fake: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    return 0.5 * (real - real_target).pow(2).mean() + 0.5 * fake.pow(2).mean()


def g_loss_lsgan(fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (fake - 1).pow(2).mean()


def d_loss_rpgan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing GAN (RpGAN; R3GAN's loss): each real must score above its paired fake.

    -log sigmoid(D(real) - D(fake)) = softplus(D(fake) - D(real)), averaged over the pairs.
    """
    return F.softplus(fake - real).mean()


def g_loss_rpgan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """RpGAN's generator side: each fake must score above its paired real."""
    return F.softplus(real - fake).mean()


G_LOSSES = {"nonsaturating": g_loss_nonsaturating, "hinge": g_loss_hinge, "wgan_gp": g_loss_wgan,
            "lsgan": g_loss_lsgan}
LOSSES = (*G_LOSSES, "rpgan")  # rpgan's G loss also needs the real logits (g_loss_rpgan)


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: mean (||grad critic(x_hat)|| - 1)^2 at points between real and fake (eps: (B,) in [0, 1])."""
    eps = eps.view(-1, 1, 1, 1).to(real.device, real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def r1_penalty(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of dD/dx at `images` (which must require grad); weighted gamma/2.

    At real images this is R1 (Mescheder et al. 2018), at generated ones R2: R3GAN takes
    both, so that D is smooth where either distribution lies.
    """
    (grad,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


r2_penalty = r1_penalty  # the same formula, at fakes
