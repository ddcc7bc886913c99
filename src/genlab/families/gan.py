"""GAN family: DCGAN or ResNet (SNGAN-style) networks, four losses, the usual stabilisers.

Phases per optimizer step: `n_critic` discriminator updates ("d") then one generator
update ("g"). Losses are small module-level functions so they can be checked by hand.
`GanDiagnostics` watches the logs and warns when D dominates or samples collapse.
The export (`generator.safetensors` + `generator_config.json`) loads with `load_generator`,
which needs only torch and safetensors.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genlab.errors import ConfigError, GenlabError

log = logging.getLogger(__name__)
LOSSES = ("nonsaturating", "hinge", "wgan_gp", "lsgan")


# ---- losses (logits in, scalar out) ------------------------------------------------------
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


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: mean (||grad critic(x_hat)|| - 1)^2 at random points between real and fake."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1: mean squared norm of dD/dx at real images (`real` must require grad). Weighted gamma/2."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


# ---- DiffAugment (Zhao et al. 2020): differentiable, applied to real and fake alike ------
def _color(x: torch.Tensor) -> torch.Tensor:
    r = lambda: torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)  # noqa: E731
    x = x + (r() - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r() * 2) + mean  # saturation (a no-op on grey images)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r() + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    shift = torch.randint(-int(h * ratio + 0.5), int(h * ratio + 0.5) + 1, (b, 2), device=x.device).to(x.dtype)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = shift[:, 0] * 2 / w, shift[:, 1] * 2 / h  # whole-pixel shifts
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device) - ch // 2
    left = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device) - cw // 2
    ys, xs = torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]
    hole = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)  # (B, H, W)
    return x * (~hole)[:, None].to(x.dtype)


AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: list[str]) -> torch.Tensor:
    for name in policy:
        x = AUGMENTS[name](x)
    return x


# ---- networks ----------------------------------------------------------------------------
def _levels(image_size: int) -> int:
    """Number of 2x resolution steps between 4x4 and image_size."""
    levels = int(math.log2(image_size // 4)) if image_size >= 8 else 0
    if image_size < 8 or 4 * 2**levels != image_size:
        raise ConfigError(f"data.image_size={image_size}: the GAN needs 4 x a power of two (8, 16, 32, 64, ...)")
    return levels


class _ResUp(nn.Module):
    """SNGAN generator block: BN-ReLU-up-conv-BN-ReLU-conv, plus an upsampled 1x1 shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.main = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Upsample(scale_factor=2),
                                  nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 1))

    def forward(self, x):
        return self.main(x) + self.skip(x)


class _ResDown(nn.Module):
    """SNGAN discriminator block: ReLU-conv-ReLU-conv-avgpool, plus a 1x1-avgpool shortcut."""

    def __init__(self, cin: int, cout: int, preact: bool = True):
        super().__init__()
        self.main = nn.Sequential(nn.ReLU() if preact else nn.Identity(), nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1), nn.AvgPool2d(2))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.AvgPool2d(2))

    def forward(self, x):
        return self.main(x) + self.skip(x)


class Generator(nn.Module):
    """z (B, latent_dim) [+ label] -> images (B, channels, image_size, image_size) in [-1, 1].

    Width doubles at each lower resolution (capped at 8x `width`). Conditional: a class
    embedding is concatenated to z.
    """

    def __init__(self, arch: str, latent_dim: int, image_size: int, channels: int, width: int,
                 num_classes: int | None = None):
        super().__init__()
        levels = _levels(image_size)
        chans = [width * min(2 ** (levels - i), 8) for i in range(levels + 1)]  # 4x4 ... image_size
        self.latent_dim, self.start = latent_dim, chans[0]
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.stem = nn.Linear(latent_dim * (2 if num_classes else 1), chans[0] * 16)
        if arch == "resnet":
            blocks = [_ResUp(a, b) for a, b in zip(chans, chans[1:])]
        else:  # DCGAN (pre-activation order so both archs share the head)
            blocks = [nn.Sequential(nn.BatchNorm2d(a), nn.ReLU(), nn.ConvTranspose2d(a, b, 4, 2, 1))
                      for a, b in zip(chans, chans[1:])]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(chans[-1]), nn.ReLU(), nn.Conv2d(chans[-1], channels, 3, 1, 1),
                                  nn.Tanh())

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(label)], dim=1)
        return self.head(self.blocks(self.stem(z).view(len(z), self.start, 4, 4)))


class Discriminator(nn.Module):
    """images [+ label] -> logits (B,). Global sum pooling, then a linear head plus, when
    conditional, the projection term <embed(y), h> (Miyato & Koyama 2018)."""

    def __init__(self, arch: str, image_size: int, channels: int, width: int, num_classes: int | None = None,
                 use_spectral_norm: bool = True):
        super().__init__()
        levels = _levels(image_size)
        chans = [width * min(2**i, 8) for i in range(levels + 1)]  # image_size ... 4x4
        if arch == "resnet":
            blocks = [_ResDown(channels, chans[0], preact=False)]  # first block sees raw pixels
            blocks += [_ResDown(a, b) for a, b in zip(chans, chans[1:])]
            self.features = nn.Sequential(*blocks, nn.ReLU())  # 2x more downsampling: ends at 2x2
        else:  # DCGAN with LeakyReLU; no BatchNorm (it breaks gradient penalties)
            layers = [nn.Conv2d(channels, chans[0], 3, 1, 1), nn.LeakyReLU(0.2)]
            for a, b in zip(chans, chans[1:]):
                layers += [nn.Conv2d(a, b, 4, 2, 1), nn.LeakyReLU(0.2)]
            self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(chans[-1], 1)
        self.embed = nn.Embedding(num_classes, chans[-1]) if num_classes else None
        if use_spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    spectral_norm(m)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))  # (B, C)
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(label) * h).sum(1)
        return out


def load_generator(directory: str | Path) -> Generator:
    """Rebuild an exported generator (eval mode) from `generator_config.json` + `generator.safetensors`."""
    directory = Path(directory)
    generator = Generator(**json.loads((directory / "generator_config.json").read_text()))
    generator.load_state_dict(load_file(directory / "generator.safetensors"))
    return generator.eval()


# ---- diagnostics -------------------------------------------------------------------------
class GanDiagnostics:
    """Warns (one line: reason + suggestion) when training goes the usual bad ways.

    `record` keeps detached tensors (no device sync); `check_balance` and `check_diversity`
    sync once each and are meant to run every few hundred steps.

    Args:
        window: recorded values examined by `check_balance`.
        acc_threshold: D accuracy above which, over the whole window, D dominates.
        trend: relative change between the window's halves that counts as rising/falling.
        diversity_ratio: warn when the fakes' spread is below this fraction of the reals'.
    """

    def __init__(self, window: int = 100, acc_threshold: float = 0.95, trend: float = 0.1,
                 diversity_ratio: float = 0.3):
        self.acc_threshold, self.trend, self.diversity_ratio = acc_threshold, trend, diversity_ratio
        self.history = {k: deque(maxlen=window) for k in ("d_acc", "d_loss", "g_loss")}
        self.active: set[str] = set()  # conditions already warned about (warn again only after they clear)

    def record(self, logs: dict[str, torch.Tensor]) -> None:
        for k, values in self.history.items():
            if k in logs:
                values.append(logs[k].detach())

    def _warn(self, key: str, message: str | None) -> str | None:
        if message and key not in self.active:
            log.warning(message)
        self.active.discard(key) if message is None else self.active.add(key)
        return message

    def check_balance(self) -> str | None:
        """Warn when D's accuracy stays above the threshold, or g_loss rises while d_loss falls."""
        full = {k: torch.stack(list(v)).float().cpu() for k, v in self.history.items()
                if len(v) == v.maxlen}
        message = None
        if "d_acc" in full and full["d_acc"].min() > self.acc_threshold:
            message = (f"discriminator dominates: accuracy > {self.acc_threshold} for the last {len(full['d_acc'])} "
                       "updates; try model.diffaug=color,translation,cutout, a larger model.r1_gamma, "
                       "model.instance_noise=0.1 or a lower model.d_lr_scale")
        elif "d_loss" in full and "g_loss" in full:
            (d0, d1), (g0, g1) = ([half.mean() for half in full[k].chunk(2)] for k in ("d_loss", "g_loss"))
            scale = lambda a: self.trend * max(abs(float(a)), 1e-3)  # noqa: E731
            if g1 - g0 > scale(g0) and d0 - d1 > scale(d0):
                message = (f"discriminator is winning: g_loss rose {float(g0):.3g} -> {float(g1):.3g} while d_loss "
                           f"fell {float(d0):.3g} -> {float(d1):.3g}; try model.diffaug=color,translation,cutout, "
                           "model.r1_gamma, or a lower model.d_lr_scale")
        return self._warn("balance", message)

    def check_diversity(self, fake: torch.Tensor, real: torch.Tensor) -> str | None:
        """Warn when the mean pairwise pixel distance of `fake` falls well below that of `real`."""
        spread = lambda x: torch.pdist(x.detach().flatten(1).float()).mean().item()  # noqa: E731
        fake_spread, real_spread = spread(fake), spread(real)
        message = None
        if fake_spread < self.diversity_ratio * real_spread:
            message = (f"sample diversity collapsed: fixed-noise fakes spread {fake_spread:.3g} vs {real_spread:.3g} "
                       "for real images (mean pairwise distance); likely mode collapse: try model.loss=hinge with "
                       "spectral norm, model.diffaug, or a lower trainer.lr")
        return self._warn("diversity", message)
