"""A ControlNet on a frozen Sana base: `FlowControlNet` with Sana's DC-AE, Gemma 2 prompts and sampler.

`model=controlnet model.base=<a SanaPipeline directory>` builds `SanaControlNet` (the builder
`controlnet.ControlNet` picks it by the base's kind). What differs from SD3, each as diffusers'
`SanaControlNetPipeline` does it, so the export samples the same there:
- the VAE is DC-AE (32x down, 32 channels): deterministic latents times scaling_factor, no shift;
  the sketch's the same way;
- the prompt is Gemma 2's last hidden state with its padding mask, behind the pipeline's "complex
  human instruction" (its last max_sequence_length tokens kept); the empty caption (caption
  dropout, CFG's negative) is encoded without it, as the pipeline encodes its negative prompt;
- the ControlNet is the base's config with its first 7 blocks copied (diffusers has no
  `from_transformer` for Sana); the transformer adds its block samples;
- the base samples with DPM-Solver++ over flow sigmas (`--sampler dpm`, the default: the base's own
  scheduler, as plain diffusers loads it); training uses the same noise levels (flow matching with
  the scheduler's flow_shift, `flow_controlnet.training_scheduler`); euler and heun also sample.
Sampling passes `use_resolution_binning=False`: the pipeline would otherwise generate small images at
its training resolution and resize them.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

import torch

from genlab.errors import GenlabError
from genlab.families import latent_diffusion as ld
from genlab.families.controlnet_options import ControlNetOptions
from genlab.families.flow_controlnet import FlowControlNet

BASE_SAMPLER = "dpm"  # the base's own scheduler (DPM-Solver++ on flow sigmas)


class SanaControlNet(FlowControlNet):
    """A trainable `SanaControlNetModel` on a frozen Sana base (see the module docstring)."""

    def __init__(self, options: ControlNetOptions):
        wanted = options.sampler or BASE_SAMPLER
        super().__init__(replace(options, sampler=None if wanted == BASE_SAMPLER else wanted))
        self.sampler_name = wanted
        # The instruction the pipeline puts before every prompt: its own default, read from its signature.
        self.instruction = inspect.signature(type(self.prompt_pipe).__call__).parameters[
            "complex_human_instruction"].default

    def image_latents(self, batch: dict[str, Any], rng: ld.StepRandom) -> torch.Tensor:
        if batch.get("latent_cache"):
            raise GenlabError("data.cache_latents: the latent cache holds posteriors, and Sana's DC-AE has none; "
                              "set data.cache_latents=false.")
        return self._latents(batch["image"])

    def control_latents(self, sketch: torch.Tensor, rng: ld.StepRandom) -> torch.Tensor:
        return self._latents(sketch * 2 - 1)  # the pipeline's [-1, 1] control image

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent
        return latent.float() * self.vae.config.scaling_factor

    def vae_shape(self) -> tuple[int, int]:
        config = self.vae.config
        return config.in_channels, 2 ** (len(config.encoder_block_out_channels) - 1)

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states", "encoder_attention_mask"} as the pipeline encodes a prompt (with its
        instruction) or, for an empty caption, its negative prompt (without)."""
        def encoded(instruction):
            text, mask, _, _ = self.prompt_pipe.encode_prompt(list(captions), do_classifier_free_guidance=False,
                                                              max_sequence_length=self.text_tokens,
                                                              complex_human_instruction=instruction)
            return text, mask

        text, mask = encoded(self.instruction)
        empty = torch.tensor([c == "" for c in captions], device=text.device)
        if empty.any():
            plain_text, plain_mask = encoded(False)
            text = torch.where(empty.view(-1, 1, 1), plain_text, text)
            mask = torch.where(empty.view(-1, 1), plain_mask, mask)
        return {"encoder_hidden_states": text, "encoder_attention_mask": mask}

    def velocity(self, noisy: torch.Tensor, t: torch.Tensor, text: dict, control: torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.controlnet(noisy, timestep=t, controlnet_cond=control, return_dict=False, **text)[0]
        pred = self.transformer(noisy, timestep=t, controlnet_block_samples=tuple(blocks), return_dict=False,
                                **text)[0]
        return pred, target

    def call_options(self, n: int, guidance: float) -> dict[str, Any]:
        return {"guidance_scale": guidance, "use_resolution_binning": False}

    def pipeline(self, sampler: str):
        if sampler != BASE_SAMPLER:
            return super().pipeline(sampler)
        pipe = super().pipeline(self.diffusion.default_sampler())
        pipe.scheduler = type(self.base_scheduler).from_config(self.base_scheduler.config)  # a fresh one per pipeline
        return pipe

    @property
    def base_scheduler(self):
        return ld.base_scheduler(self.base)
