"""A ControlNet on a frozen Z-Image base: `FlowControlNet` with Z-Image's text encoder, ControlNet and time.

`model=controlnet model.base=<a ZImagePipeline directory>` builds `ZImageControlNet` (the builder
`controlnet.ControlNet` picks it by the base's kind). What differs from Flux, each as diffusers'
`ZImageControlNetPipeline` does it, so the export samples the same there:
- the prompt is Qwen3's second-to-last hidden state over the chat-formatted caption, one tensor
  per caption (its own length, no padding);
- the ControlNet shares the base's embedders and refiners (`z_image_parts`) and adds its control
  blocks' outputs at every EVERY-th base block; the sketch enters as its VAE latents' mode (the
  pipeline's `sample_mode="argmax"`), (z - shift) * scale like the image's;
- latents are not packed (the transformer patchifies one-frame latents itself), its timestep is
  1 - sigma and it predicts x0 - noise (the pipeline negates it);
- `model.guidance` (w, the classic CFG scale: 1 = off) is the pipeline's guidance_scale w - 1: its CFG
  is pos + g (pos - neg), 0 off, against the empty prompt (which caption dropout trains).
The objective is the core's flow matching with the base scheduler's fixed shift (3 for Z-Image-Turbo).
"""

from __future__ import annotations

from typing import Any

import torch

from genlab.families import latent_diffusion as ld
from genlab.families import z_image_parts
from genlab.families.controlnet_options import ControlNetOptions
from genlab.families.flow_controlnet import FlowControlNet


class ZImageControlNet(FlowControlNet):
    """A trainable `ZImageControlNetModel` on a frozen Z-Image base (see the module docstring)."""

    def __init__(self, options: ControlNetOptions):
        super().__init__(options)
        z_image_parts.share_on_call(ld.unwrap(self.controlnet), ld.unwrap(self.transformer))

    def control_latents(self, sketch: torch.Tensor, rng: ld.StepRandom) -> torch.Tensor:
        vae = self.vae.config
        mode = self.vae.encode((sketch * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return (mode.float() - vae.shift_factor) * vae.scaling_factor

    def encode(self, captions: list[str]) -> dict[str, Any]:
        return encode_prompt(self.prompt_pipe, captions, self.text_tokens)

    def velocity(self, noisy: torch.Tensor, t: torch.Tensor, text: dict, control: torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z_image_parts.velocity(self.controlnet, self.transformer, noisy, t, text["cap_feats"], control), target

    def call_options(self, n: int, guidance: float) -> dict[str, Any]:
        return call_options(n, guidance)

    def pipeline(self, sampler: str):
        pipe = super().pipeline(sampler)  # the pipeline's __init__ shares the base's modules for good:
        z_image_parts.unshare(ld.unwrap(self.controlnet))  # they come back for each call (share_on_call)
        return pipe


def encode_prompt(pipe, captions: list[str], tokens: int) -> dict[str, Any]:
    """Z-Image's pipeline's own prompt encoding: {"cap_feats": one (tokens, D) tensor per caption}."""
    feats, _ = pipe.encode_prompt(list(captions), do_classifier_free_guidance=False, max_sequence_length=tokens)
    return {"cap_feats": feats}


def call_options(n: int, guidance: float) -> dict[str, Any]:
    """`model.guidance` w (classic CFG, 1 = off) as the pipelines' guidance_scale w - 1."""
    return {"guidance_scale": guidance - 1}  # neg + w (pos - neg) == pos + (w - 1) (pos - neg)
