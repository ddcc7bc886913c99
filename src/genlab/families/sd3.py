"""SD3-style text-to-image: an MMDiT (diffusers' SD3Transformer2DModel) trained by rectified flow on latents.

Tiny from scratch, offline: a VAE from `model.vae` (a genlab VAE run or an AutoencoderKL),
two tiny CLIP text encoders with projections (SD3's CLIP-L and CLIP-G roles; no T5: diffusers'
pipeline then feeds zeros in its place) over the offline CLIP tokenizer, and a small MMDiT.
The diffusion core (`genlab.diffusion`) supplies the flow target, timesteps, weighting and
samplers; prompts are encoded by `StableDiffusion3Pipeline.encode_prompt` in training too, so
training and sampling see the same text features.

Exports a `StableDiffusion3Pipeline` directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import nn
from transformers import CLIPTextModelWithProjection

from genlab.data.latent_cache import cached_or_encoded_latents
from genlab.diffusion import Diffusion
from genlab.errors import ConfigError, GenlabError
from genlab.families import latent_diffusion as ld
from genlab.families.contract import Card, OnePhase
from genlab.families.repa import build_repa
from genlab.text import clip_tokenizer, tiny_text_config

#: T5 tokens of the pipeline's zero stand-in for the absent T5 encoder (SD3 uses 256 real ones).
T5_TOKENS = 1


class StableDiffusion3(OnePhase):
    """Text-to-image rectified flow with an MMDiT (see the module docstring).

    Args:
        image_size, channels: from the data (channels must be the VAE's).
        vae: the VAE (genlab VAE run, AutoencoderKL dir or hub id). Required.
        tokenizer_dir: where the offline CLIP tokenizer is cached (None: ~/.cache/genlab).
        mmdit: SD3Transformer2DModel arguments (num_layers, num_attention_heads, attention_head_dim,
            caption_projection_dim, patch_size).
        text_encoder: the tiny CLIP config of each of the two text encoders (trained with the MMDiT).
        caption_dropout: fraction of captions replaced by "" (for classifier-free guidance).
        sampler, sample_steps, guidance: sampling defaults (sampler None: euler).
        validation_data: the data config; its val split supplies default sample prompts.
        repa: `model.repa`: REPA's alignment of an MMDiT block's image tokens (families.repa); off by default.
        **diffusion: the diffusion core's keys; model.objective must be flow (SD3's pipeline samples flow).
    """

    name = "sd3"
    card = Card(what="an SD3-style text-to-image pipeline (MMDiT trained by rectified flow, VAE, two CLIP text "
                     "encoders, no T5)", title="sd3", library_name="diffusers", pipeline_tag="text-to-image",
                tags=("diffusers", "sd3", "mmdit", "flow-matching", "text-to-image", "diffusers:StableDiffusion3Pipeline"),
                use='from diffusers import StableDiffusion3Pipeline\n\n'
                    'pipe = StableDiffusion3Pipeline.from_pretrained("{where}", text_encoder_3=None, tokenizer_3=None)\n'
                    'image = pipe("a red circle on a blue background", max_sequence_length=1).images[0]')
    losses = ("loss", "diffusion_loss", "repa_loss")
    metrics: dict[str, str] = {}

    def __init__(self, image_size: int, channels: int = 3, vae: str | None = None, tokenizer_dir: str | None = None,
                 mmdit: dict | None = None, text_encoder: dict | None = None, caption_dropout: float = 0.1,
                 sampler: str | None = None, sample_steps: int = 25, guidance: float = 5.0,
                 validation_data: Any = None, repa: dict | None = None, **diffusion: Any):
        if not vae:
            raise ConfigError("model.vae: a VAE is needed to train sd3 from scratch; train one "
                              "(`genlab train model=vae data=...`) and pass model.vae=RUN_DIR.")
        self.image_size = image_size
        self.vae = ld.load_pretrained(AutoencoderKL, ld.plain(vae), "vae")
        if channels != self.vae.config.in_channels:
            raise ConfigError(f"data.channels={channels}, but the VAE takes {self.vae.config.in_channels}-channel images.")
        if self.vae.config.shift_factor is None:  # SD3's pipeline adds it when decoding
            self.vae.register_to_config(shift_factor=0.0)
        self.vae.requires_grad_(False).eval()
        text_cfg = tiny_text_config(**(ld.plain(text_encoder) or {}))
        self.tokenizer = clip_tokenizer(tokenizer_dir)
        self.text_encoder = CLIPTextModelWithProjection(text_cfg)
        self.text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
        cfg = dict(ld.plain(mmdit) or {})
        latent = image_size // ld.vae_factor(self.vae)
        patch = cfg.get("patch_size", 2)
        if image_size % ld.vae_factor(self.vae) or latent % patch:
            raise ConfigError(f"data.image_size={image_size}: the latent grid must be a multiple of "
                              f"model.mmdit.patch_size={patch}.")
        width = 2 * text_cfg.hidden_size  # the two CLIPs' hidden states side by side, as SD3 does
        self.transformer = SD3Transformer2DModel(
            sample_size=latent, in_channels=self.vae.config.latent_channels,
            out_channels=self.vae.config.latent_channels, joint_attention_dim=width,
            pooled_projection_dim=2 * text_cfg.projection_dim, pos_embed_max_size=latent // patch, **cfg)
        self.repa = build_repa(self.transformer, ld.plain(repa), image_size, channels)
        if self.repa:  # trained and checkpointed beside the MMDiT; not exported
            self.repa_projector = self.repa.projector
        self.diffusion = Diffusion.build(**{"objective": "flow", **diffusion})
        if self.diffusion.objective != "flow":
            raise ConfigError(f"model.objective={self.diffusion.objective}: sd3 trains flow (StableDiffusion3Pipeline "
                              "samples only flow schedulers); use model=sd for epsilon, v or x0.")
        self.ema_network = "transformer"
        self.num_classes = None
        self.caption_dropout = caption_dropout
        self.sampler_name = self.diffusion.check_sampler(sampler or self.diffusion.default_sampler())
        self.sample_steps, self.guidance = sample_steps, guidance
        self.validation_data = validation_data
        self._val_prompts: list[str] | None = None

    # --- the Family protocol ------------------------------------------------------------

    def networks(self) -> dict[str, nn.Module]:
        # Random CLIPs barely tell colours apart: the text encoders train with the MMDiT.
        return {"transformer": self.transformer, "text_encoder": self.text_encoder,
                "text_encoder_2": self.text_encoder_2, **({"repa_projector": self.repa_projector} if self.repa else {})}

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: ld.StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = cached_or_encoded_latents(batch, self.vae, rng)  # (B, c, H/f, W/f)
        captions = ld.drop_captions(batch["caption"], self.caption_dropout, rng)
        text, pooled = self.encode(captions)
        noisy, t, target, weight = self.diffusion.training_inputs(latents, rng)
        pred = self.transformer(noisy, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
        loss = self.diffusion.loss(pred, target, weight)
        if not self.repa:
            return loss, {"loss": loss.detach()}
        repa_loss = self.repa.loss(self.repa_projector, batch.get("image"))
        total = loss + self.repa.weight * repa_loss
        return total, {"loss": total.detach(), "diffusion_loss": loss.detach(), "repa_loss": repa_loss.detach()}

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "StableDiffusion3":
        ld.move(self.vae, device, ld.weight_dtype_for(device, dtype))
        for net in self.networks().values():
            net.to(device)
        return self

    @torch.no_grad()
    def sample(self, n: int, seed: int, prompt: str | list[str] | None = None, sampler: str | None = None,
               steps: int | None = None, guidance: float | None = None, negative_prompt: str | None = None,
               **options: Any) -> torch.Tensor:
        """`n` images for `prompt` (default: captions of the first val items), (n, 3, H, W) in [-1, 1]."""
        if options:
            raise GenlabError(f"sd3: unknown sample option(s) {sorted(options)}; sd3 takes prompt, sampler, steps, "
                              "guidance, negative_prompt.")
        pipe = self.pipeline(sampler or self.sampler_name)
        prompts = ld.as_list(prompt, n, self.default_prompts(n))
        with ld.eval_mode(pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
            out = pipe(prompts, height=self.image_size, width=self.image_size,
                       num_inference_steps=self.diffusion.check_steps(steps or self.sample_steps),
                       guidance_scale=self.guidance if guidance is None else guidance,
                       negative_prompt=[negative_prompt] * n if negative_prompt else None,
                       max_sequence_length=T5_TOKENS, generator=ld.generators(n, seed), output_type="pt").images
        return out.float() * 2 - 1

    def export(self, out_dir: Path) -> None:
        """A `StableDiffusion3Pipeline` directory (no T5: `text_encoder_3` is None)."""
        self.pipeline(self.sampler_name).save_pretrained(out_dir)

    # --- helpers -----------------------------------------------------------------------

    def pipeline(self, sampler: str) -> StableDiffusion3Pipeline:
        """A diffusers SD3 pipeline over this family's (unwrapped) parts and the named sampler."""
        pipe = StableDiffusion3Pipeline(
            transformer=ld.unwrap(self.transformer), scheduler=self.diffusion.inference_scheduler(sampler),
            vae=self.vae, text_encoder=ld.unwrap(self.text_encoder), tokenizer=self.tokenizer,
            text_encoder_2=ld.unwrap(self.text_encoder_2), tokenizer_2=self.tokenizer,
            text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text tokens (B, 77 + T5_TOKENS, 2D), pooled (B, 2P)): the pipeline's own prompt encoding."""
        text, _, pooled, _ = self.pipeline(self.sampler_name).encode_prompt(
            list(captions), None, None, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
        return text, pooled

    def default_prompts(self, n: int) -> list[str]:
        if self._val_prompts is None:
            self._val_prompts = [item.get("caption", "") for item in ld.validation_items(self.validation_data, n)]
        return self._val_prompts
