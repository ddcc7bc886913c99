"""`SketchConditioned`: what both ControlNet families share on the sketch side, and the sketches they read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from genlab.errors import GenlabError
from genlab.families.contract import diffusers_blocks
from genlab.families.latent_diffusion import as_list, validation_items


def load_sketch(sketch: Any, size: int, n: int) -> torch.Tensor:
    """A sketch (path, PIL image, or tensor (C, H, W) / (B, C, H, W) in [0, 1]) as (n, 3, size, size)."""
    from genlab.data.sketches import resize_crop

    if isinstance(sketch, (str, Path)):
        try:
            sketch = Image.open(sketch)
        except OSError as e:
            raise GenlabError(f"--sketch {sketch}: cannot read the image ({e}).") from e
    if isinstance(sketch, Image.Image):
        pixels = np.asarray(resize_crop(sketch.convert("RGB"), size, Image.BILINEAR), dtype=np.float32) / 255.0
        sketch = torch.from_numpy(pixels).permute(2, 0, 1)
    sketch = sketch.float()
    if sketch.dim() == 3:
        sketch = sketch[None]
    if sketch.shape[1] == 1:
        sketch = sketch.expand(-1, 3, -1, -1)
    if sketch.shape[-2:] != (size, size):
        sketch = F.interpolate(sketch, size=(size, size), mode="bilinear", align_corners=False)
    return sketch[torch.arange(n) % sketch.shape[0]]


class SketchConditioned:
    """What both ControlNet families (`controlnet.UNetControlNet`, `flow_controlnet.FlowControlNet`) share
    on the sketch side: sampling defaults, the fixed validation pairs and the sketch | image grids.

    A family calls `init_sampling` in its constructor, sets the attributes declared below as set by
    the family, and has `sample` and its frozen denoiser under the attribute named by `denoiser`.
    """

    #: sample() options that genlab eval fills from validation items (sketch-following metrics).
    conditions = ("sketch", "prompt")
    #: the attribute holding the base's denoiser ("unet" or "transformer"): trained when it has LoRA.
    denoiser = "unet"

    # Set by the family's __init__:
    image_size: int  #: the data's image size (sketches are resized to it)
    controlnet: nn.Module  #: the trainable ControlNet
    lora_rank: int  #: the LoRA rank on the base's denoiser (0: none, the denoiser stays frozen)
    # Set by init_sampling:
    ema_network: None  #: no EMA for ControlNets (as in the paper)
    num_classes: None
    caption_dropout: float
    sampler_name: str
    sample_steps: int
    guidance: float
    control_scale: float
    validation_data: Any  #: the data config whose first val items are the fixed sample pairs
    _val_items: list[dict] | None  #: those items, read once by validation_pairs

    def networks(self) -> dict[str, nn.Module]:
        nets = {"controlnet": self.controlnet}
        if self.lora_rank > 0:
            nets[self.denoiser] = getattr(self, self.denoiser)
        return nets

    def shard_units(self) -> dict[str, list[nn.Module]]:
        """strategy=fsdp: the ControlNet's blocks and the frozen base denoiser's (U-Net down/mid/up,
        SD3/Flux transformer blocks); the VAE and text encoders are sharded as one unit each."""
        units = {"controlnet": diffusers_blocks(self.controlnet),
                 self.denoiser: diffusers_blocks(getattr(self, self.denoiser))}
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if isinstance(getattr(self, name, None), nn.Module):
                units[name] = []
        return units

    def init_sampling(self, diffusion: Any, options: Any) -> None:
        """Sampling defaults (sampler None: the objective's default), the data of the validation pairs,
        and what every ControlNet shares: no EMA (as in the paper), no classes, caption dropout.
        `options`: the family's `controlnet_options.ControlNetOptions`."""
        o = options
        self.ema_network, self.num_classes, self.caption_dropout = None, None, o.caption_dropout
        self.sampler_name = diffusion.check_sampler(o.sampler or diffusion.default_sampler())
        self.sample_steps, self.guidance, self.control_scale = o.sample_steps, o.guidance, o.control_scale
        self.validation_data = o.validation_data
        self._val_items: list[dict] | None = None

    def validation_pairs(self, n: int) -> list[dict]:
        """The first `n` val items of the training data (read once, then kept)."""
        if self._val_items is None or len(self._val_items) < n:
            self._val_items = validation_items(self.validation_data, n)
        return self._val_items[:n]

    def sample_conditions(self, n: int, sketch: Any, prompt: str | list[str] | None) -> tuple[torch.Tensor, list[str]]:
        """`sample`'s inputs: (n sketches (n, 3, H, W) in [0, 1], n prompts); with no sketch, the first
        val pairs' sketches and captions."""
        if sketch is None:
            pairs = self.validation_pairs(n)
            if not pairs:
                raise GenlabError("controlnet: no sketch given and no validation data; pass --sketch PATH.")
            sketch = torch.stack([item["sketch"] for item in pairs])
            default_prompts = [item.get("caption", "") for item in pairs]
        else:
            default_prompts = [""]
        return load_sketch(sketch, self.image_size, n), as_list(prompt, n, default_prompts)

    @torch.no_grad()
    def sample_pairs(self, n: int, seed: int, **options: Any) -> torch.Tensor:
        """`sketch | output` side by side for the first `n` val pairs: (n, 3, H, 2W) in [-1, 1]."""
        pairs = self.validation_pairs(n)
        sketches = load_sketch(torch.stack([item["sketch"] for item in pairs]), self.image_size, n)
        images = self.sample(n, seed, **options)
        return torch.cat([sketches.to(images.device) * 2 - 1, images], dim=3)
