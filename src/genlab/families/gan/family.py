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
from genlab.families.base import Card, StepRandom, batch_labels, refuse_unknown_sample_options, unwrap

log = logging.getLogger(__name__)


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


# ---- DiffAugment (Zhao et al. 2020): differentiable, applied to real and fake alike ------
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


# ---- networks ----------------------------------------------------------------------------
#: Residual blocks per resolution in the r3gan networks: R3GAN has 2 at CIFAR-10 size; 1 nearly halves
#: a step on the CPU (0.28 instead of 0.49 s at width 16, batch 64, one thread).
R3_BLOCKS = 1
ARCHS = ("dcgan", "resnet", "r3gan")


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


class _R3Block(nn.Module):
    """R3GAN's residual block: 1x1 conv (widen) - grouped 3x3 conv - 1x1 conv (narrow), leaky ReLUs,
    no normalisation. The last conv starts at zero (as in Fixup), so each block starts as the
    identity and the network as a plain stack of transitions: stable without normalisation."""

    def __init__(self, channels: int, expansion: int = 2, group_size: int = 16):
        super().__init__()
        hidden = channels * expansion
        self.body = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(hidden, hidden, 3, 1, 1, groups=max(1, hidden // group_size)),
                                  nn.LeakyReLU(0.2), nn.Conv2d(hidden, channels, 1, bias=False))
        nn.init.zeros_(self.body[-1].weight)

    def forward(self, x):
        return x + self.body(x)


class _R3Transition(nn.Module):
    """Between resolutions: bilinear 2x resampling and a 1x1 conv to the new width (R3GAN's transition)."""

    def __init__(self, cin: int, cout: int, up: bool):
        super().__init__()
        self.conv, self.up = nn.Conv2d(cin, cout, 1), up

    def forward(self, x):
        if self.up:  # widths shrink going up: resample the narrower output
            return F.interpolate(self.conv(x), scale_factor=2, mode="bilinear", align_corners=False)
        # antialias: a [1, 3, 3, 1] low-pass before taking every second pixel
        return self.conv(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False))


def _r3_stages(chans: list[int], up: bool, blocks: int) -> list[nn.Module]:
    """`blocks` residual blocks at each width of `chans`, with transitions between them."""
    layers: list[nn.Module] = []
    for i, c in enumerate(chans):
        if i:
            layers.append(_R3Transition(chans[i - 1], c, up))
        layers += [_R3Block(c) for _ in range(blocks)]
    return layers


def _upsample_conv(cin: int, cout: int, upsample: str) -> list[nn.Module]:
    """2x upsampling + conv: a strided transposed conv (DCGAN), or nearest-neighbour then a 3x3 conv,
    which cannot make the transposed conv's uneven-overlap checkerboard (Odena et al. 2016)."""
    if upsample == "transposed":
        return [nn.ConvTranspose2d(cin, cout, 4, 2, 1)]
    return [nn.Upsample(scale_factor=2, mode=upsample), nn.Conv2d(cin, cout, 3, 1, 1)]


class Generator(nn.Module):
    """z (B, latent_dim) [+ label] -> images (B, channels, image_size, image_size) in [-1, 1]
    (r3gan: unbounded, as in R3GAN; `GAN.sample` clamps).

    Width doubles at each lower resolution (capped at 8x `width`). Conditional: a class
    embedding, times the buffer `cond_scale` (0..1, see GAN's cond_transition), is
    concatenated to z.
    """

    def __init__(self, arch: str, latent_dim: int, image_size: int, channels: int, width: int,
                 num_classes: int | None = None, upsample: str = "transposed"):
        super().__init__()
        levels = _levels(image_size)
        chans = [width * min(2 ** (levels - i), 8) for i in range(levels + 1)]  # 4x4 ... image_size
        self.latent_dim, self.start = latent_dim, chans[0]
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.register_buffer("cond_scale", torch.ones(()))
        self.stem = nn.Linear(latent_dim * (2 if num_classes else 1), chans[0] * 16)
        if arch == "r3gan":  # no normalisation, no tanh: a linear 1x1 conv to pixels (samples are clamped)
            self.blocks = nn.Sequential(*_r3_stages(chans, up=True, blocks=R3_BLOCKS))
            self.head = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(chans[-1], channels, 1))
        else:  # pre-activation order so that DCGAN and ResNet share the head
            self.blocks = nn.Sequential(*[_ResUp(a, b) if arch == "resnet" else
                                          nn.Sequential(nn.BatchNorm2d(a), nn.ReLU(), *_upsample_conv(a, b, upsample))
                                          for a, b in zip(chans, chans[1:])])
            self.head = nn.Sequential(nn.BatchNorm2d(chans[-1]), nn.ReLU(),
                                      nn.Conv2d(chans[-1], channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.cond_scale * self.embed(label)], dim=1)
        return self.head(self.blocks(self.stem(z).view(len(z), self.start, 4, 4)))


class Discriminator(nn.Module):
    """images [+ label] -> logits (B,). Global sum pooling (r3gan: a 4x4 "basis" layer), then a linear head plus, when
    conditional, the projection term <embed(y), h> (Miyato & Koyama 2018) times the buffer
    `cond_scale` (0..1, see GAN's cond_transition)."""

    def __init__(self, arch: str, image_size: int, channels: int, width: int, num_classes: int | None = None,
                 use_spectral_norm: bool = True):
        super().__init__()
        levels = _levels(image_size)
        chans = [width * min(2**i, 8) for i in range(levels + 1)]  # image_size ... 4x4
        self.flatten = arch == "r3gan"
        if arch == "r3gan":
            self.features = nn.Sequential(nn.Conv2d(channels, chans[0], 1),
                                          *_r3_stages(chans, up=False, blocks=R3_BLOCKS), nn.LeakyReLU(0.2))
            # R3GAN ends in a 4x4 "basis" layer rather than a sum over positions: D knows where
            # things are (a blob at the border is not a stroke at the centre).
            self.basis = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * 16, chans[-1]), nn.LeakyReLU(0.2))
        elif arch == "resnet":
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
        self.register_buffer("cond_scale", torch.ones(()))
        if use_spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    spectral_norm(m)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        h = self.basis(h) if self.flatten else h.sum(dim=(2, 3))  # (B, C)
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            out = out + self.cond_scale * (self.embed(label) * h).sum(1)
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
                       "updates; try model.diffaug=[color,translation,cutout], a larger model.r1_gamma, "
                       "model.instance_noise=0.1 or a lower model.d_lr_scale")
        elif "d_loss" in full and "g_loss" in full:
            (d0, d1), (g0, g1) = ([half.mean() for half in full[k].chunk(2)] for k in ("d_loss", "g_loss"))
            scale = lambda a: self.trend * max(abs(float(a)), 1e-3)  # noqa: E731
            if g1 - g0 > scale(g0) and d0 - d1 > scale(d0):
                message = (f"discriminator is winning: g_loss rose {float(g0):.3g} -> {float(g1):.3g} while d_loss "
                           f"fell {float(d0):.3g} -> {float(d1):.3g}; try model.diffaug=[color,translation,cutout], "
                           "model.r1_gamma, or a lower model.d_lr_scale")
        return self._warn("balance", message)

    def check_diversity(self, fake: torch.Tensor, real: torch.Tensor, fake_labels: torch.Tensor | None = None,
                        real_labels: torch.Tensor | None = None) -> str | None:
        """Warn when the mean pairwise pixel distance of `fake` falls well below that of `real`.

        With labels (a conditional GAN) the spread is measured within each class and averaged
        over the classes both sets have: a generator that draws one image per class spreads
        as widely as the data across classes, so only the within-class spread shows collapse.
        """
        if fake_labels is None or real_labels is None:
            fake_spread, real_spread, where = pixel_spread(fake), pixel_spread(real), ""
        else:
            classes = [k for k in real_labels.unique().tolist()
                       if (real_labels == k).sum() >= 2 and (fake_labels == k).sum() >= 2]
            if not classes:
                return None
            fake_spread = sum(pixel_spread(fake[fake_labels == k]) for k in classes) / len(classes)
            real_spread = sum(pixel_spread(real[real_labels == k]) for k in classes) / len(classes)
            where = f" within a class ({len(classes)} classes)"
        message = None
        if fake_spread < self.diversity_ratio * real_spread:
            fixes = "model.mode_seeking=1.0, " if where else ""  # a cGAN drawing one image per class
            message = (f"sample diversity collapsed: fixed-noise fakes spread {fake_spread:.3g} vs {real_spread:.3g} "
                       f"for real images{where} (mean pairwise distance); likely mode collapse: try {fixes}"
                       "model.loss=hinge with spectral norm, model.diffaug, or a lower trainer.lr")
        return self._warn("diversity", message)


def pixel_spread(images: torch.Tensor) -> float:
    """Mean pairwise L2 distance between images (N >= 2)."""
    return torch.pdist(images.detach().flatten(1).float()).mean().item()


# ---- the family --------------------------------------------------------------------------
def mode_seeking_ratio(fake_a: torch.Tensor, fake_b: torch.Tensor, z_a: torch.Tensor,
                       z_b: torch.Tensor) -> torch.Tensor:
    """Image distance over latent distance for pairs of fakes (MSGAN, Mao et al. 2019).

    A generator that ignores z (one image per class) scores 0; the G loss adds
    weight / ratio, so such a generator pays more the closer it gets.
    """
    return (fake_a - fake_b).float().abs().mean() / (z_a - z_b).float().abs().mean()


def same_class_distance(real: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-pixel L1 distance between real images of the same class (any two when unlabelled).

    The spread that pairs of fakes sharing a label should reach; inf when the batch has no
    such pair (then nothing caps the mode-seeking term).
    """
    flat = real.detach().flatten(1).float()
    dist = torch.cdist(flat, flat, p=1) / flat.shape[1]  # (B, B)
    same = ~torch.eye(len(flat), dtype=torch.bool, device=flat.device)
    if labels is not None:
        same &= labels[:, None] == labels[None, :]
    return dist[same].mean() if same.any() else torch.tensor(float("inf"), device=flat.device)


def latent_noise(n: int, latent_dim: int, seed: int, truncation: float = 0.0) -> torch.Tensor:
    """Seeded z (n, latent_dim): standard normal, or with `truncation` > 0 the truncation trick
    (BigGAN): a normal truncated at +-truncation, trading variety for cleaner samples."""
    generator = torch.Generator().manual_seed(seed)
    if truncation < 0:
        raise GenlabError(f"truncation={truncation}: use 0 (off) or a threshold such as 1.0 or 0.5")
    if not truncation:
        return torch.randn(n, latent_dim, generator=generator)
    return torch.nn.init.trunc_normal_(torch.empty(n, latent_dim), 0.0, 1.0, -truncation, truncation,
                                       generator=generator)


class GAN:
    """Unconditional or class-conditional GAN (projection discriminator).

    Args:
        image_size, channels: image shape (from the data config); image_size = 4 x 2^k.
        num_classes: label count (from the data), needed when `conditional`.
        conditional: class-conditional G (embedding concatenated to z) and projection D.
        cond_transition: [start, end] optimizer steps over which the label's weight in G and D
            rises linearly from 0 to 1 (transitional training, Shahbazi et al. 2022): before
            `start` both train unconditionally. Conditioned from step 0 on little data, a cGAN
            tends to draw one image per class. [0, 0] = conditioned from the start.
        arch: "dcgan", "resnet" (SNGAN-style residual blocks) or "r3gan" (R3GAN's modernised ResNet:
            1-3-1 grouped-conv blocks, bilinear resampling, no normalisation; use spectral_norm=false).
        latent_dim: size of z.
        g_channels, d_channels: network widths at full resolution (doubling per level, capped at 8x).
        loss: "nonsaturating" | "hinge" | "wgan_gp" | "lsgan" | "rpgan" (relativistic pairing, R3GAN's).
        spectral_norm: spectral normalisation on every discriminator layer.
        r1_gamma: R1 penalty weight on reals (loss += gamma/2 * R1); 0 = off.
        r2_gamma: R2 penalty weight on fakes (loss += gamma/2 * R2); 0 = off. R3GAN: both, equal.
        gp_weight: WGAN-GP penalty weight (loss=wgan_gp).
        n_critic: discriminator updates per generator update.
        d_lr_scale, g_lr_scale: multiply trainer.lr per network (TTUR).
        betas: Adam betas for both networks, overriding the optimizer's (GANs want a low beta1); None keeps them.
        instance_noise: initial std of Gaussian noise added to D's inputs, annealed linearly to 0
            over `instance_noise_steps`.
        label_smoothing: one-sided: the real target is 1 - this (nonsaturating and lsgan).
        diffaug: DiffAugment policies, a list ([color, translation, cutout]) or a comma-separated
            string ("color,translation"); empty = off.
        diffaug_padding: what translation fills the uncovered strip with: "reflection" (the image's
            own border mirrored), "border" (its edge pixels repeated) or "zeros" (DiffAugment's
            original; mid-grey in [-1, 1], unlike any digit's background).
        g_upsample: DCGAN generator upsampling: "transposed" (strided transposed conv), "nearest"
            or "bilinear" (resize, then a 3x3 conv).
        truncation: sampling only: z from a normal truncated at +-truncation (BigGAN's truncation
            trick); 0 = off. `genlab sample --truncation` overrides it.
        mode_seeking: weight of MSGAN's mode-seeking term in the G loss (weight / image-over-latent
            distance of fake pairs with the same label); 0 = off. Keeps a cGAN from drawing
            one image per class.
        mode_seeking_cap: the term stops rewarding distance once same-label fakes are as far
            apart as same-class reals in the batch (false: MSGAN's unbounded term, which bought
            distance with artifacts).
        diag_every: optimizer steps between diagnostics (0 = off); diag_window: values they look at.
    """

    name = "gan"
    # safetensors + JSON is no Hub library's format: no library name.
    card = Card(what="a GAN generator (generator.safetensors + generator_config.json)", title="GAN",
                pipeline_tag="unconditional-image-generation", tags=("gan", "pytorch", "safetensors"),
                use='from genlab.families.gan import load_generator\n\ngenerator = load_generator("{where}")')
    losses = ("g_loss", "d_loss")
    metrics: dict[str, str] = {}

    def __init__(self, image_size: int, channels: int, num_classes: int | None = None, conditional: bool = False,
                 arch: str = "dcgan", latent_dim: int = 64, g_channels: int = 64, d_channels: int = 64,
                 loss: str = "hinge", spectral_norm: bool = True, r1_gamma: float = 0.0, r2_gamma: float = 0.0,
                 gp_weight: float = 10.0,
                 n_critic: int = 1, d_lr_scale: float = 1.0, g_lr_scale: float = 1.0,
                 betas: list[float] | None = (0.5, 0.999), instance_noise: float = 0.0,
                 instance_noise_steps: int = 1000, label_smoothing: float = 0.0, diffaug: str | list[str] = "",
                 diag_every: int = 200, diag_window: int = 100, truncation: float = 0.0,
                 cond_transition: list[int] = (0, 0), mode_seeking: float = 0.0, diffaug_padding: str = "reflection",
                 g_upsample: str = "transposed", mode_seeking_cap: bool = True):
        if arch not in ARCHS:
            raise ConfigError(f"model.arch={arch!r}: use one of {', '.join(ARCHS)}")
        if loss not in LOSSES:
            raise ConfigError(f"model.loss={loss!r}: use one of {', '.join(LOSSES)}")
        if conditional and not num_classes:
            raise ConfigError("model.conditional=true needs labelled data (data.num_classes is null); "
                              "use data=digits or set model.conditional=false")
        if arch == "r3gan" and spectral_norm:
            # Its residual blocks start with zero-initialised convolutions: spectral norm divides by their norm, 0.
            raise ConfigError("model.arch=r3gan with model.spectral_norm=true gives NaN at the first step (zero-initialised "
                              "layers); R3GAN regularises with R1 and R2 instead: set model.spectral_norm=false.")
        policies = diffaug.split(",") if isinstance(diffaug, str) else list(diffaug or [])
        self.diffaug = [p.strip() for p in policies if p.strip()]
        unknown = [p for p in self.diffaug if p not in AUGMENTS]
        if unknown:
            raise ConfigError(f"model.diffaug: unknown {', '.join(unknown)}; use a list of {', '.join(AUGMENTS)}, "
                              "e.g. model.diffaug=[color,translation]")
        self.ema_network = "generator"
        if diffaug_padding not in PADDINGS:
            raise ConfigError(f"model.diffaug_padding={diffaug_padding!r}: use one of {', '.join(PADDINGS)}")
        if g_upsample not in ("transposed", "nearest", "bilinear"):
            raise ConfigError(f"model.g_upsample={g_upsample!r}: use transposed, nearest or bilinear")
        self.diffaug_padding = diffaug_padding
        self.num_classes = num_classes if conditional else None
        self.loss_name, self.r1_gamma, self.r2_gamma = loss, r1_gamma, r2_gamma
        self.gp_weight, self.n_critic = gp_weight, n_critic
        self.lr_scales, self.betas = {"d": d_lr_scale, "g": g_lr_scale}, betas
        self.instance_noise, self.instance_noise_steps = instance_noise, instance_noise_steps
        self.real_target, self.diag_every = 1.0 - label_smoothing, diag_every
        self.truncation = truncation
        start, end = cond_transition
        if not 0 <= start <= end:
            raise ConfigError(f"model.cond_transition={list(cond_transition)}: use [start, end] optimizer steps "
                              "with 0 <= start <= end, e.g. [500, 1500]; [0, 0] conditions from the start")
        self.cond_transition = (start, end)
        self.mode_seeking, self.mode_seeking_cap = mode_seeking, mode_seeking_cap
        self.generator_config = {"arch": arch, "latent_dim": latent_dim, "image_size": image_size,
                                 "channels": channels, "width": g_channels, "num_classes": self.num_classes,
                                 "upsample": g_upsample}
        self.generator = Generator(**self.generator_config)
        self.discriminator = Discriminator(arch, image_size, channels, d_channels, self.num_classes, spectral_norm)
        self.diagnostics = GanDiagnostics(window=diag_window)

    @property
    def eval_variants(self) -> dict[str, dict[str, float]]:
        """What `genlab eval` measures besides the default samples: truncation 1.0 and 0.5 (variety
        traded for confidence), and no truncation when model.truncation is set."""
        return {f"truncation_{t:g}": {"truncation": t} for t in (0.0, 1.0, 0.5) if t != self.truncation}

    # ---- the Family protocol ----------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def param_groups(self) -> dict[str, list[dict[str, Any]]]:
        groups = {}
        for phase, network in (("d", self.discriminator), ("g", self.generator)):
            group = {"params": [p for p in network.parameters() if p.requires_grad], "lr_scale": self.lr_scales[phase]}
            if self.betas is not None:
                group["betas"] = tuple(self.betas)
            groups[phase] = [group]
        return groups

    def phases(self, step: int) -> list[str]:
        return ["d"] * self.n_critic + ["g"]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "GAN":
        self.generator.to(device)  # both trainable: fp32 under mixed precision
        self.discriminator.to(device)
        return self

    def cond_scale_at(self, step: int) -> float:
        """The label's weight in G and D at optimizer step `step` (cond_transition)."""
        start, end = self.cond_transition
        if step >= end:
            return 1.0
        if step <= start:  # also a hard switch at start == end
            return 0.0
        return (step - start) / (end - start)

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real, labels = batch["image"], batch_labels(batch, self.num_classes)
        if self.num_classes and self.cond_transition[1]:
            scale = self.cond_scale_at(step)
            for network in (self.generator, self.discriminator):
                unwrap(network).cond_scale.fill_(scale)
        z = rng.randn(len(real), self.generator_config["latent_dim"]).to(real.device)
        # The loop clears every network's gradients before each phase: G's phase leaves none in D.
        if phase == "d":
            with torch.no_grad():
                fake = self.generator(z, labels)
            loss, logs = self._d_loss(real, fake, labels, step, rng)
        else:
            half, fake_labels = len(z) // 2, labels
            if self.mode_seeking and half and labels is not None:
                fake_labels = labels[:half].repeat(2)  # pairs (i, i + half) share a label, differ in z
                z = z[:2 * half]
            fake = self.generator(z, fake_labels)
            fake_logits = self._discriminate(fake, fake_labels, step, rng).float()
            if self.loss_name == "rpgan":  # pairs each fake with a real; only the fake side trains G
                with torch.no_grad():
                    pairs = slice(0, len(fake))
                    real_logits = self._discriminate(real[pairs], None if labels is None else labels[pairs], step, rng)
                loss = g_loss_rpgan(real_logits.float(), fake_logits)
            else:
                loss = G_LOSSES[self.loss_name](fake_logits)
            logs = {"g_loss": loss.detach()}
            if self.mode_seeking and half:
                z_a, z_b = z[:half], z[half:2 * half]
                ratio = mode_seeking_ratio(fake[:half], fake[half:2 * half], z_a, z_b)
                # MSGAN's weight / ratio rewards ever more pixel difference between same-label fakes;
                # past the data's own spread G bought it with bright blocks and broken strokes
                # (docs/evaluation.md, GAN artifacts). Capped, the reward stops at the real spread.
                at_data_spread = 0.0  # 1 / ratio for fakes as far apart as same-class reals
                if self.mode_seeking_cap:
                    at_data_spread = (z_a - z_b).float().abs().mean() / same_class_distance(real, labels)
                loss = loss + self.mode_seeking * F.relu(1 / (ratio + 1e-5) - at_data_spread)
                logs["ms_ratio"] = ratio.detach()
        self.diagnostics.record(logs)
        return loss, logs

    @torch.no_grad()
    def sample(self, n: int, seed: int, **options: Any) -> torch.Tensor:
        """n images (n, C, H, W) in [-1, 1] from seeded z; `class_label=k` for a conditional GAN
        (default: classes cycling 0..K-1); `truncation` overrides model.truncation."""
        opts = {k: v for k, v in options.items() if v is not None and v is not False}
        class_label = opts.pop("class_label", None)
        truncation = float(opts.pop("truncation", self.truncation))
        refuse_unknown_sample_options(opts, "GAN", "--class and --truncation", class_label, self.num_classes)
        generator = unwrap(self.generator)
        device = next(generator.parameters()).device
        z = latent_noise(n, self.generator_config["latent_dim"], seed, truncation)
        labels = None
        if self.num_classes:
            labels = torch.arange(n) % self.num_classes if class_label is None else torch.full((n,), class_label)
            labels = labels.to(device)
        was_training = generator.training
        generator.eval()  # BatchNorm running statistics: samples do not depend on the batch
        try:
            return generator(z.to(device), labels).float().clamp(-1, 1)
        finally:
            generator.train(was_training)

    def export(self, out_dir: Path) -> None:
        """`generator.safetensors` + `generator_config.json` (its constructor arguments); see `load_generator`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in unwrap(self.generator).state_dict().items()}
        save_file(state, out_dir / "generator.safetensors")
        (out_dir / "generator_config.json").write_text(json.dumps(self.generator_config, indent=2))

    # ---- internals --------------------------------------------------------------------
    # ---- the Diagnosed capability: the loop calls this every `diag_every` steps -----------
    @torch.no_grad()
    def diagnose(self, batch: dict[str, Any]) -> list[str]:
        """D/G balance from the recorded logs, and the spread of a fixed-noise fake batch against
        the batch's real images (within each class when conditional). Returns the warnings (also logged)."""
        real, labels = batch["image"], batch_labels(batch, self.num_classes)
        messages = [self.diagnostics.check_balance()]
        if len(real) >= 2:  # sample() uses the bare generator in eval mode and restores train mode
            fake = self.sample(64, seed=0)  # conditional: classes cycle 0..K-1
            fake_labels = torch.arange(len(fake), device=fake.device) % self.num_classes if self.num_classes else None
            messages.append(self.diagnostics.check_diversity(fake, real, fake_labels, labels))
        return [m for m in messages if m]

    def _d_loss(self, real, fake, labels, step, rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real = real.detach().requires_grad_(self.r1_gamma > 0)
        fake = fake.detach().requires_grad_(self.r2_gamma > 0)
        real_logits = self._discriminate(real, labels, step, rng).float()
        fake_logits = self._discriminate(fake, labels, step, rng).float()
        logs = {}
        if self.loss_name == "rpgan":
            loss = d_loss_rpgan(real_logits, fake_logits)
        elif self.loss_name == "nonsaturating":
            loss = d_loss_nonsaturating(real_logits, fake_logits, self.real_target)
        elif self.loss_name == "hinge":
            loss = d_loss_hinge(real_logits, fake_logits)
        elif self.loss_name == "lsgan":
            loss = d_loss_lsgan(real_logits, fake_logits, self.real_target)
        else:
            gp = gradient_penalty(lambda x: self.discriminator(x, labels).float(), real, fake, rng.rand(len(real)))
            loss = d_loss_wgan(real_logits, fake_logits) + self.gp_weight * gp
            logs["gp"] = gp.detach()
        if self.r1_gamma > 0:
            r1 = r1_penalty(real_logits, real)
            loss = loss + self.r1_gamma / 2 * r1
            logs["r1"] = r1.detach()
        if self.r2_gamma > 0:
            r2 = r2_penalty(fake_logits, fake)
            loss = loss + self.r2_gamma / 2 * r2
            logs["r2"] = r2.detach()
        real_logits, fake_logits = real_logits.detach(), fake_logits.detach()
        # Where D's decision boundary lies: 0 for logits, 0.5 for LSGAN's 0/1 targets, the
        # midpoint of the batch for an (unbounded) WGAN critic or a relativistic D.
        midpoint = (real_logits.mean() + fake_logits.mean()) / 2  # relativistic scores drift as a whole
        threshold = {"lsgan": 0.5, "wgan_gp": midpoint, "rpgan": midpoint}.get(self.loss_name, 0.0)
        to_score = torch.sigmoid if self.loss_name == "nonsaturating" else (lambda t: t)
        accuracy = ((real_logits > threshold).float().mean() + (fake_logits < threshold).float().mean()) / 2
        logs |= {"d_loss": loss.detach(), "d_real": to_score(real_logits).mean(),
                 "d_fake": to_score(fake_logits).mean(), "d_acc": accuracy}
        if self.instance_noise:
            logs["instance_noise"] = torch.tensor(self._noise_std(step), device=real.device)
        return loss, logs

    def _discriminate(self, x: torch.Tensor, labels: torch.Tensor | None, step: int, rng: StepRandom) -> torch.Tensor:
        """D on augmented, noised inputs (the same for reals and fakes, in both phases)."""
        if self.diffaug:
            x = diff_augment(x, self.diffaug, rng, self.diffaug_padding)
        std = self._noise_std(step)
        if std > 0:
            x = x + std * rng.randn_like(x)
        return self.discriminator(x, labels)

    def _noise_std(self, step: int) -> float:
        if not self.instance_noise:
            return 0.0
        return self.instance_noise * max(0.0, 1.0 - step / max(1, self.instance_noise_steps))

