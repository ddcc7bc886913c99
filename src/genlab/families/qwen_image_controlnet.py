"""A ControlNet on a frozen Qwen-Image base: `FlowControlNet` with Qwen-Image's VAE, text encoder and packing.

`model=controlnet model.base=<a QwenImagePipeline directory>` builds `QwenImageControlNet` (the
builder `controlnet.ControlNet` picks it by the base's kind). What differs from Flux, each as
diffusers' `QwenImageControlNetPipeline` does it, so the export samples the same there:
- the VAE (`AutoencoderKLQwenImage`, Wan's) is a video VAE: images go in as one-frame videos and
  the latents are normalised per channel by the config's latents_mean / latents_std (no
  scaling_factor / shift_factor); the sketch's latents the same way;
- the prompt is Qwen2.5-VL's last hidden state over the pipeline's chat template (its system prompt
  dropped), with a padding mask the transformer and ControlNet attend through;
- latents are packed 2x2 as Flux's, positions come from `img_shapes`, timesteps in [0, 1];
- `model.guidance` is the pipeline's `true_cfg_scale` (real CFG against the empty prompt, which caption
  dropout trains): Qwen-Image has no guidance embedding.
The objective is the core's flow matching with Qwen-Image's resolution-dependent shift exp(mu)
(`flow_controlnet.training_scheduler`).
"""

from __future__ import annotations

from typing import Any

import torch

from genlab.errors import GenlabError
from genlab.families import latent_diffusion as ld
from genlab.families.flow_controlnet import FlowControlNet, pack


def normalised_latents(vae: torch.nn.Module, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, z, H/8, W/8) latents as the pipelines normalise them.

    `noise` (the posterior's shape, (B, z, 1, h, w)) draws a posterior sample; None: the mean.
    """
    posterior = vae.encode(images.unsqueeze(2).to(vae.device, vae.dtype)).latent_dist  # a one-frame video
    z = posterior.mean if noise is None else posterior.mean + posterior.std * noise
    config = vae.config
    mean = torch.tensor(config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return ((z.float() - mean) / std).squeeze(2)


class QwenImageControlNet(FlowControlNet):
    """A trainable `QwenImageControlNetModel` on a frozen Qwen-Image base (see the module docstring)."""

    def image_latents(self, batch: dict[str, Any], rng: ld.StepRandom) -> torch.Tensor:
        if batch.get("latent_cache"):
            raise GenlabError("data.cache_latents: the latent cache holds 2D VAEs' posteriors, not Qwen-Image's "
                              "video VAE's; set data.cache_latents=false.")
        return self._sampled(batch["image"], rng)

    def control_latents(self, sketch: torch.Tensor, rng: ld.StepRandom) -> torch.Tensor:
        return self._sampled(sketch * 2 - 1, rng)  # the pipeline's [-1, 1] control image, a posterior sample

    def _sampled(self, images: torch.Tensor, rng: ld.StepRandom) -> torch.Tensor:
        return sampled_latents(self.vae, images, rng)

    def vae_shape(self) -> tuple[int, int]:
        return vae_shape(self.vae)

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor | None]:
        return encode_prompt(self.prompt_pipe, captions, self.text_tokens)

    def velocity(self, noisy: torch.Tensor, t: torch.Tensor, text: dict, control: torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's packed velocity (B, h/2 * w/2, 4c), the ControlNet's block samples added."""
        common = transformer_inputs(noisy, t, text)
        blocks = self.controlnet(**common, controlnet_cond=pack(control), return_dict=False)
        pred = self.transformer(**common, controlnet_block_samples=blocks, return_dict=False)[0]
        return pred, pack(target)

    def call_options(self, n: int, guidance: float) -> dict[str, Any]:
        return call_options(n, guidance)


def vae_shape(vae: torch.nn.Module) -> tuple[int, int]:
    """(image channels, spatial downsampling factor) of Qwen-Image's video VAE."""
    config = vae.config
    return config.input_channels, 2 ** len(config.temperal_downsample)


def sampled_latents(vae: torch.nn.Module, images: torch.Tensor, rng: ld.StepRandom) -> torch.Tensor:
    """Normalised posterior samples (B, z, h, w) of `images` in [-1, 1], the noise drawn from `rng`."""
    b, _, h, w = images.shape
    factor = vae_shape(vae)[1]
    noise = rng.randn(b, vae.config.z_dim, 1, h // factor, w // factor).to(vae.device, torch.float32)
    return normalised_latents(vae, images, noise)


def encode_prompt(pipe, captions: list[str], tokens: int) -> dict[str, torch.Tensor | None]:
    """The pipeline's own prompt encoding: {"encoder_hidden_states", "encoder_hidden_states_mask"} (mask None
    when no caption is padded, as the pipeline passes it)."""
    text, mask = pipe.encode_prompt(list(captions), max_sequence_length=tokens)
    return {"encoder_hidden_states": text, "encoder_hidden_states_mask": mask}


def transformer_inputs(noisy: torch.Tensor, t: torch.Tensor, text: dict) -> dict[str, Any]:
    """What Qwen-Image's pipelines hand its transformer (and ControlNet) for latents (B, c, h, w) at steps t in
    [0, 1000]: packed latents, t / 1000, the image shapes and the prompt's tensors."""
    b, _, h, w = noisy.shape
    return dict(hidden_states=pack(noisy), timestep=t / 1000, img_shapes=[(1, h // 2, w // 2)] * b, **text)


def call_options(n: int, guidance: float) -> dict[str, Any]:
    """`model.guidance` as the pipelines take it: true CFG, which needs a negative prompt there; the empty one is
    what caption dropout trains."""
    return {"true_cfg_scale": guidance, "negative_prompt": [""] * n if guidance > 1 else None}
