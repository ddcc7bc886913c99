"""What a Flux.2 [klein] base's pipeline (`Flux2KleinPipeline`) feeds its transformer, for model=lora.

- Latents: the VAE's posterior (32 channels at 1/8), 2x2 patches folded into channels (128 at 1/16),
  normalised by the VAE's batch-norm statistics (no scale or shift factor), then flattened to tokens.
- Prompts: Qwen3's chat template without thinking, hidden states of layers 9, 18 and 27 side by side
  (`encode_prompt`), with 4D position ids for text and image tokens.
- Time: sigma in [0, 1] (the transformer multiplies by 1000); no guidance embedding.
- Shift: exp(mu), mu from the image token count and the number of sampling steps
  (`compute_empirical_mu`): training draws its noise levels as the pipeline samples at `sample_steps`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from genlab.families import latent_diffusion as ld


def _pipeline_class():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def sampled_latents(vae: nn.Module, images: torch.Tensor, rng: ld.StepRandom) -> torch.Tensor:
    """Normalised, patchified posterior samples (B, 4z, h/2, w/2) of `images` in [-1, 1], noise drawn from `rng`."""
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return normalised(vae, (posterior.mean + posterior.std * rng.randn_like(posterior.mean)).float())


def normalised(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, z, h, w) as the transformer sees them: 2x2-patched (B, 4z, h/2, w/2), batch-norm normalised
    (what the pipeline undoes before decoding)."""
    patches = _pipeline_class()._patchify_latents(z)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patches)
    return (patches - mean) / std


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, c, h, w) patchified latents as the pipeline's tokens (B, h * w, c)."""
    return _pipeline_class()._pack_latents(latents)


def encode_prompt(pipe, captions: list[str], tokens: int) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoding: {"encoder_hidden_states", "txt_ids"}."""
    text, text_ids = pipe.encode_prompt(list(captions), device=pipe.text_encoder.device, max_sequence_length=tokens)
    return {"encoder_hidden_states": text, "txt_ids": text_ids}


def transformer_inputs(noisy: torch.Tensor, t: torch.Tensor, text: dict) -> dict[str, Any]:
    """What the pipeline hands its transformer for latents (B, c, h, w) at steps t in [0, 1000]."""
    ids = _pipeline_class()._prepare_latent_ids(noisy).to(noisy.device)
    return dict(hidden_states=pack(noisy), timestep=t / 1000, img_ids=ids, guidance=None, **text)


def training_shift(latent_tokens: int, sample_steps: int) -> float:
    """exp(mu): the shift the pipeline samples `latent_tokens` image tokens with in `sample_steps` steps."""
    import math

    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return math.exp(compute_empirical_mu(latent_tokens, sample_steps))
