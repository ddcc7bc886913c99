"""REPA: align a hidden layer of the denoiser with a frozen image encoder (Yu et al., 2025).

The denoiser's hidden states at one layer, mapped by a small trained projector, are pulled
towards the features a frozen self-supervised encoder sees in the clean image: one cosine
term per token, added to the diffusion loss with `model.repa.weight`. The projector trains
with the model, is checkpointed with it, and is left out of the export (the denoiser samples
exactly as before). Nothing of REPA is built when the weight is 0 or no encoder is named, so
such a run is today's run, bit for bit.

Encoders (`model.repa.encoder`):
- `digits_cnn`: the digits classifier `genlab eval` trains offline (its second convolution's
  feature map, 64 channels on an 8 x 8 grid at 16 px); what the tests and the digits recipe use.
- `dinov2:<hub id or folder>`: a DINOv2 through transformers (REPA's choice:
  facebook/dinov2-base), its patch tokens as the feature map; needs the network or a local copy.

Layers (`model.repa.layer`, counted from 1): a DiT's or an MMDiT's transformer blocks (an MMDiT
block's image stream); a U-Net's down blocks then its middle block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import GenlabError

#: ImageNet's mean and std, which DINOv2 was trained with.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_CNN_CHANNELS = 64  # DigitsCNN's second convolution


class DigitsCnnFeatures(nn.Module):
    """The digits classifier's map after its second convolution: (B, 64, s/2, s/2) at work size s."""

    def __init__(self, image_size: int, channels: int):
        super().__init__()
        from genlab.eval.features import load_or_train_digits_cnn  # trained once, offline, cached

        self.cnn = load_or_train_digits_cnn(image_size, channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] != self.cnn.channels:
            x = x.mean(1, keepdim=True).expand(-1, self.cnn.channels, -1, -1)
        size = self.cnn.work_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return self.cnn.body[:5](x)  # conv, relu, pool, conv, relu


class Dinov2Features(nn.Module):
    """A transformers DINOv2's patch tokens as a map (B, hidden, g, g), images in [-1, 1]."""

    def __init__(self, where: str):
        super().__init__()
        from transformers import AutoModel

        try:
            self.model = AutoModel.from_pretrained(where)
        except OSError as error:
            raise GenlabError(f"model.repa.encoder=dinov2:{where} cannot be loaded ({str(error).splitlines()[0]}); "
                              "give a hub id with the network, or a folder holding a transformers DINOv2.") from None
        self.size = self.model.config.image_size
        self.skip = 1 + getattr(self.model.config, "num_register_tokens", 0)  # the CLS (and register) tokens
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        tokens = self.model(pixel_values=(x - self.mean) / self.std).last_hidden_state[:, self.skip:]
        grid = int(tokens.shape[1] ** 0.5)
        return tokens.transpose(1, 2).reshape(len(x), -1, grid, grid)


def encoder_channels(encoder: str) -> int:
    """The feature width of `encoder`, read without building it (the projector is built before any step)."""
    if encoder == "digits_cnn":
        return DIGITS_CNN_CHANNELS
    if encoder.startswith("dinov2:"):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(encoder.removeprefix("dinov2:")).hidden_size
        except OSError as error:
            raise GenlabError(f"model.repa.encoder={encoder} cannot be read ({str(error).splitlines()[0]}); give a hub "
                              "id with the network, or a folder holding a transformers DINOv2.") from None
    raise GenlabError(f"model.repa.encoder={encoder!r}: use digits_cnn (offline) or dinov2:<hub id or folder>.")


def hidden_layers(denoiser: nn.Module) -> list[nn.Module]:
    """The modules whose outputs `model.repa.layer` counts: DiT blocks, or U-Net down blocks then the middle block."""
    if hasattr(denoiser, "transformer_blocks"):
        return list(denoiser.transformer_blocks)
    if hasattr(denoiser, "down_blocks"):
        return [*denoiser.down_blocks, denoiser.mid_block]
    raise GenlabError(f"model.repa: no layers to align in a {type(denoiser).__name__}; REPA works on DiT and U-Net denoisers.")


def image_stream(denoiser: nn.Module) -> int:
    """Which element of a layer's tuple output is the image: an MMDiT block gives (text, image), a U-Net down block (image, skips)."""
    return -1 if hasattr(denoiser, "context_embedder") else 0


def as_tokens(hidden: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A layer's image output as tokens (B, h*w, C) and its grid (h, w): transformer blocks give tokens on a
    square grid, U-Net blocks maps."""
    if hidden.dim() == 4:
        return hidden.flatten(2).transpose(1, 2), (hidden.shape[2], hidden.shape[3])
    grid = int(hidden.shape[1] ** 0.5)
    return hidden, (grid, grid)


class Repa:
    """The alignment term of one denoiser: a hook on its layer, the projector and the frozen encoder.

    Args:
        denoiser: the network whose hidden states are aligned (hooked once here).
        encoder, weight, layer, projector_dim: `model.repa.*` (see configs/model/ddpm.yaml).
        image_size, channels: of the training images (what the digits classifier is trained for).
    """

    def __init__(self, denoiser: nn.Module, encoder: str, weight: float, layer: int, projector_dim: int,
                 image_size: int, channels: int):
        layers = hidden_layers(denoiser)
        if not 1 <= layer <= len(layers):
            raise GenlabError(f"model.repa.layer={layer}: this denoiser has {len(layers)} layers to align (1 to "
                              f"{len(layers)}); REPA aligns an early one (SiT-XL: 8 of 28).")
        self.encoder_name, self.weight, self.image_size, self.channels = encoder, weight, image_size, channels
        self.encoder: nn.Module | None = None  # built at the first step: sampling a run never needs it
        self.hidden: torch.Tensor | None = None
        self.stream = image_stream(denoiser)
        layers[layer - 1].register_forward_hook(self._keep)
        width = self._width(denoiser, layers[layer - 1])
        # What the family trains and checkpoints as its `repa_projector` network (REPA: a 3-layer MLP per token).
        # Linear layers on tokens, not 1x1 convolutions on maps: the same function, 3x faster on the CPU.
        self.projector = nn.Sequential(nn.Linear(width, projector_dim), nn.SiLU(),
                                       nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                                       nn.Linear(projector_dim, encoder_channels(encoder)))

    @staticmethod
    def _width(denoiser: nn.Module, layer: nn.Module) -> int:
        if hasattr(denoiser, "transformer_blocks"):
            return denoiser.inner_dim if hasattr(denoiser, "inner_dim") else layer.norm1.linear.in_features
        return layer.resnets[-1].out_channels

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        # A reference, replaced by each forward; read by loss() right after the training one.
        self.hidden = output[self.stream] if isinstance(output, tuple) else output

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            self.encoder = (DigitsCnnFeatures(self.image_size, self.channels) if self.encoder_name == "digits_cnn"
                            else Dinov2Features(self.encoder_name.removeprefix("dinov2:")))
            self.encoder.requires_grad_(False).eval()
        self.encoder.to(images.device)
        with torch.no_grad():
            return self.encoder(images)

    def loss(self, projector: nn.Module, x0: torch.Tensor | None) -> torch.Tensor:
        """1 - the mean cosine similarity of projected hidden states and the encoder's features of `x0`, per token.

        `projector`: the family's attribute (the loop may have wrapped `self.projector` for its strategy).
        """
        if x0 is None:
            raise GenlabError("model.repa aligns with the encoder's view of the clean images, and this batch holds "
                              "only cached latents: set data.cache_latents=false to train with REPA.")
        tokens, grid = as_tokens(self.hidden)
        projected = projector(tokens.float())
        target = self._encode(x0)
        if target.shape[-2:] != grid:  # the encoder's grid onto the layer's
            target = F.adaptive_avg_pool2d(target, grid) if target.shape[-1] > grid[1] \
                else F.interpolate(target, size=grid, mode="bilinear", align_corners=False)
        return 1 - F.cosine_similarity(projected, target.flatten(2).transpose(1, 2), dim=-1).mean()


def build_repa(denoiser: nn.Module, options: dict[str, Any] | None, image_size: int, channels: int) -> Repa | None:
    """The REPA term `model.repa` asks for, or None when it is off (no encoder, or weight 0)."""
    options = dict(options or {})
    if not options.get("encoder") or not options.get("weight"):
        return None
    return Repa(denoiser, str(options["encoder"]), float(options["weight"]), int(options.get("layer", 2)),
                int(options.get("projector_dim", 256)), image_size, channels)
