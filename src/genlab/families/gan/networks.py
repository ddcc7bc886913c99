"""The generator and the discriminator (DCGAN, ResNet/SNGAN-style, R3GAN), and `load_generator` for an export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genlab.errors import ConfigError


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
