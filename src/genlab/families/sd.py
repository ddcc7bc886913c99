"""Stable Diffusion: text-to-image latent diffusion (U-Net + VAE + CLIP text encoder).

Three ways to train, one class:
- tiny from scratch: `model.base=null`, a VAE from `model.vae` (a genlab VAE run, a
  diffusers AutoencoderKL dir or a hub id), a U-Net and CLIP text encoder from config;
- full fine-tune of a pretrained base: `model.base=<hub id | diffusers dir | genlab run>`
  (with `model.vae=null` for the base's own VAE);
- LoRA fine-tune of the base: `model.lora.rank > 0` (only the adapters train).

Any objective of the diffusion core, rectified flow included (`model.objective=flow`: diffusers'
`StableDiffusionPipeline` then samples with a flow scheduler, see `genlab.diffusion.for_unet_pipelines`).
`model.backbone=mmdit` builds `families/sd3.py`'s MMDiT from the same keys instead (`stable_diffusion`).

Exports a `StableDiffusionPipeline` directory (plus `pytorch_lora_weights.safetensors`
when LoRA-trained; the pipeline's U-Net then has the LoRA merged in).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from genlab.diffusion import Diffusion
from genlab.data.latent_cache import cached_or_encoded_latents, cached_or_encoded_text
from genlab.errors import ConfigError, GenlabError
from genlab.families import base_kinds
from genlab.families import latent_diffusion as ld
from genlab.families.contract import Card, OnePhase
from genlab.families.repa import build_repa
from genlab.families.sd3 import StableDiffusion3
from genlab.text import clip_tokenizer, tiny_text_config


def load_parts(base: str | None, vae: str | None, image_size: int, unet_cfg: dict, text_cfg: dict,
               tokenizer_dir: str | None) -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel]:
    """VAE, text encoder, tokenizer and U-Net: from the base where given, else tiny from config.

    `vae` overrides the base's own VAE; with no base it is required.
    """
    if base is None and vae is None:
        raise ConfigError("model.vae: a VAE is needed to train SD from scratch. Train one "
                          "(`genlab train model=vae data=...`) and pass model.vae=RUN_DIR, or set model.base.")
    vae_model = ld.load_pretrained(AutoencoderKL, vae or base, "vae")
    if base is None:
        text_encoder = CLIPTextModel(tiny_text_config(**text_cfg))
        tokenizer = clip_tokenizer(tokenizer_dir)
        unet = ld.tiny_unet(unet_cfg, image_size, vae_model, text_encoder.config.hidden_size)
    else:
        text_encoder = ld.load_pretrained(CLIPTextModel, base, "text_encoder")
        tokenizer = ld.load_pretrained(CLIPTokenizer, base, "tokenizer")
        unet = ld.load_pretrained(UNet2DConditionModel, base, "unet")
    if unet.config.in_channels != vae_model.config.latent_channels:
        raise ConfigError(f"model.vae: its latents have {vae_model.config.latent_channels} channels but the "
                          f"base U-Net takes {unet.config.in_channels}; use the base's own VAE (model.vae=null).")
    for frozen in (vae_model, text_encoder):
        frozen.requires_grad_(False).eval()
    return vae_model, text_encoder, tokenizer, unet


def latent_diffusion_core(base: str | None, diffusion: dict[str, Any]) -> Diffusion:
    """The diffusion core on latents: the base's own scheduler when fine-tuning, else one from config.

    Any objective, flow included: the core's flow samplers carry what diffusers' U-Net pipelines
    ask of a scheduler (`genlab.diffusion.for_unet_pipelines`).
    """
    return Diffusion.build(ld.base_scheduler(base), clip_sample=False, steps_offset=1, **diffusion)


def stable_diffusion(backbone: str = "unet", mmdit: dict | None = None, **keys: Any) -> OnePhase:
    """model=sd on its denoiser (`model.backbone`): the builder that configs/model/sd.yaml targets.

    Args:
        backbone: unet (`StableDiffusion`) or mmdit (`families/sd3.py`'s MMDiT, rectified flow).
        mmdit: the MMDiT's shape (backbone=mmdit), as `model.unet` is the U-Net's.
        **keys: the other model.* keys; `objective` null means the backbone's own (epsilon or flow).

    Runs saved before model.backbone target `StableDiffusion` itself and load as they did.
    """
    if backbone == "unet":
        return StableDiffusion(**{**keys, "objective": keys.get("objective") or "epsilon"})
    if backbone != "mmdit":
        raise ConfigError(f"model.backbone={backbone!r}: use unet or mmdit.")
    return mmdit_from_sd_keys(**{**keys, "mmdit": mmdit, "objective": keys.get("objective") or "flow"})


def mmdit_from_sd_keys(base: str | None = None, base_config: str | None = None, unet: dict | None = None,
                       lora: dict | None = None, train_text_encoder: bool | None = None,
                       gradient_checkpointing: bool = False, **keys: Any) -> OnePhase:
    """`StableDiffusion3` from model=sd's keys: the shared ones pass through, the U-Net's shape is dropped.

    sd3 trains a tiny MMDiT and its text encoders from scratch, so what only a base, LoRA or a
    frozen text encoder means is refused rather than silently ignored.
    """
    if base or (ld.plain(lora) or {}).get("rank", 0) > 0 or train_text_encoder is False or gradient_checkpointing:
        raise ConfigError("model.backbone=mmdit trains a tiny MMDiT and its text encoders from scratch: set "
                          "model.base=null, model.lora.rank=0, model.train_text_encoder=null and "
                          "model.gradient_checkpointing=false (or use model.backbone=unet).")
    return StableDiffusion3(**keys)


FLOW_NOTE = ("Trained by rectified flow: `StableDiffusionPipeline` asks its scheduler for two things flow schedulers "
             "lack, so set them after loading: `pipe.scheduler.init_noise_sigma = 1.0` and "
             "`pipe.scheduler.scale_model_input = lambda sample, timestep: sample`.")


class StableDiffusion(OnePhase):
    """Text-to-image latent diffusion in the SD architecture (see the module docstring).

    Args:
        image_size, channels: from the data (channels must be the VAE's, normally 3).
        base: pretrained SD pipeline (hub id, diffusers dir, genlab run or single .safetensors), or None for tiny.
        base_config: for a single-file base, a diffusers directory (or hub id) with its architecture's configs.
        vae: VAE to use (genlab VAE run, AutoencoderKL dir or hub id); None: the base's.
        tokenizer_dir: where the offline CLIP tokenizer is cached (None: ~/.cache/genlab).
        unet, text_encoder: configs of the tiny U-Net / CLIP text encoder (ignored with a base).
        lora: {rank, alpha, target_modules, dropout}; rank 0 trains the whole U-Net.
        train_text_encoder: train the text encoder with the U-Net; None = only when tiny
            from scratch (a random frozen CLIP barely tells "red" from "green").
        caption_dropout: fraction of captions replaced by "" (for classifier-free guidance).
        gradient_checkpointing: trade compute for memory in the U-Net.
        sampler, sample_steps, guidance: sampling defaults (sampler None: the objective's default).
        validation_data: the data config; its val split supplies default sample prompts.
        **diffusion: the diffusion core's keys (`genlab.diffusion.Diffusion.build`): objective,
            schedule, num_train_timesteps, zero_terminal_snr (from scratch only: a base brings its
            own schedule), shift (flow), timesteps, weighting, snr_gamma, offset_noise.
    """

    name = "sd"
    card = Card(what="a Stable Diffusion text-to-image pipeline (U-Net, VAE, CLIP text encoder)", title="SD",
                library_name="diffusers", pipeline_tag="text-to-image",
                tags=("diffusers", "stable-diffusion", "text-to-image", "diffusers:StableDiffusionPipeline"),
                use='from diffusers import StableDiffusionPipeline\n\n'
                    'pipe = StableDiffusionPipeline.from_pretrained("{where}")\n'
                    'image = pipe("a red circle on a blue background").images[0]')
    losses = ("loss", "diffusion_loss", "repa_loss")
    metrics: dict[str, str] = {}

    @classmethod
    def card_for(cls, model: Mapping[str, Any], export: Mapping[str, Any] | None = None) -> Card:
        """A flow-trained U-Net needs two scheduler attributes set (see genlab.diffusion.for_unet_pipelines);
        `model.backbone=mmdit` builds the sd3 family (`stable_diffusion`), whose card it gets."""
        if model.get("backbone") == "mmdit":
            return StableDiffusion3.card
        return replace(cls.card, notes=(FLOW_NOTE,)) if model.get("objective") == "flow" else cls.card

    def __init__(self, image_size: int, channels: int = 3, base: str | None = None, base_config: str | None = None,
                 vae: str | None = None, tokenizer_dir: str | None = None, unet: dict | None = None,
                 text_encoder: dict | None = None,
                 lora: dict | None = None, train_text_encoder: bool | None = None,
                 caption_dropout: float = 0.1, gradient_checkpointing: bool = False, sampler: str | None = None,
                 sample_steps: int = 25, guidance: float = 5.0, validation_data: Any = None,
                 repa: dict | None = None, **diffusion: Any):
        self.image_size = image_size
        self.base = ld.plain(base)
        if self.base is not None:  # a single file becomes a diffusers directory; SDXL and others are refused
            base_kinds.require_kind(str(self.base), ("sd",), "model=sd")
            self.base = base_kinds.diffusers_dir(str(self.base), base_config)
        if (ld.plain(lora) or {}).get("rank", 0) > 0 and self.base is None:
            # Checkpoints keep only the LoRA and rebuild the frozen U-Net from the base: a random one cannot be.
            raise ConfigError("model.lora.rank > 0 fine-tunes a pretrained base: set model.base, or train the tiny "
                              "U-Net from scratch with model.lora.rank=0.")
        self.vae, self.text_encoder, self.tokenizer, self.unet = load_parts(
            self.base, vae, image_size, ld.plain(unet) or {}, ld.plain(text_encoder) or {}, tokenizer_dir)
        if channels != self.vae.config.in_channels:
            raise ConfigError(f"data.channels={channels}, but the VAE takes "
                              f"{self.vae.config.in_channels}-channel images.")
        self.diffusion = latent_diffusion_core(self.base, diffusion)
        lora = ld.plain(lora) or {}
        self.lora_rank = int(lora.get("rank", 0))
        if self.lora_rank > 0:
            self.unet.requires_grad_(False)
            self.unet.add_adapter(ld.lora_config(lora))
        self.train_text_encoder = self.base is None if train_text_encoder is None else bool(train_text_encoder)
        if self.train_text_encoder:
            self.text_encoder.requires_grad_(True).train()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # EMA of a LoRA-adapted U-Net would copy the whole frozen base: only for full training.
        self.ema_network = "unet" if self.lora_rank == 0 else None
        self.num_classes = None  # conditioned on captions, not classes
        self.caption_dropout = caption_dropout
        self.sampler_name = self.diffusion.check_sampler(sampler or self.diffusion.default_sampler())
        self.sample_steps, self.guidance = sample_steps, guidance
        self.validation_data = validation_data
        self._val_prompts: list[str] | None = None
        self.weight_dtype = torch.float32
        self.repa = build_repa(self.unet, ld.plain(repa), image_size, channels)
        if self.repa:  # trained and checkpointed beside the U-Net; not exported
            self.repa_projector = self.repa.projector

    # --- the Family protocol ------------------------------------------------------------

    def networks(self) -> dict[str, nn.Module]:
        nets = {"unet": self.unet, "text_encoder": self.text_encoder} if self.train_text_encoder else {"unet": self.unet}
        return {**nets, **({"repa_projector": self.repa_projector} if self.repa else {})}

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: ld.StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = cached_or_encoded_latents(batch, self.vae, rng)  # (B, c, H/f, W/f)
        captions = ld.drop_captions(batch["caption"], self.caption_dropout, rng)
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            text = cached_or_encoded_text(batch, captions, self.tokenizer, self.text_encoder)  # (B, 77, D)
        noisy, t, target, weight = self.diffusion.training_inputs(latents, rng)
        pred = self.unet(noisy, t, encoder_hidden_states=text).sample
        loss = self.diffusion.loss(pred, target, weight)
        if not self.repa:
            return loss, {"loss": loss.detach()}
        repa_loss = self.repa.loss(self.repa_projector, batch.get("image"))
        total = loss + self.repa.weight * repa_loss
        return total, {"loss": total.detach(), "diffusion_loss": loss.detach(), "repa_loss": repa_loss.detach()}

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "StableDiffusion":
        self.weight_dtype = ld.weight_dtype_for(device, dtype)
        ld.move(self.vae, device, self.weight_dtype)
        ld.move(self.text_encoder, device, torch.float32 if self.train_text_encoder else self.weight_dtype)
        if self.lora_rank > 0:  # frozen base in the weight dtype, adapters in fp32
            ld.move(self.unet, device, self.weight_dtype)
            cast_training_params(self.unet, torch.float32)
        else:
            ld.move(self.unet, device, torch.float32)
        if self.repa:
            self.repa_projector.to(device)
        return self

    @torch.no_grad()
    def sample(self, n: int, seed: int, prompt: str | list[str] | None = None, sampler: str | None = None,
               steps: int | None = None, guidance: float | None = None, negative_prompt: str | None = None,
               lora: list[str | tuple[str, float]] | None = None, own_lora: float = 1.0,
               **options: Any) -> torch.Tensor:
        """`n` images for `prompt` (default: captions of the first val items), (n, 3, H, W) in [-1, 1].

        `lora` stacks extra U-Net LoRAs ("PATH[:weight]" or (path, weight)); `own_lora` weights
        this run's own adapter (0 swaps it out).
        """
        if options:
            raise GenlabError(f"sd: unknown sample option(s) {sorted(options)}; sd takes prompt, sampler, steps, "
                              "guidance, negative_prompt, lora, own_lora (sketches need model=controlnet).")
        pipe = self.pipeline(sampler or self.sampler_name)
        prompts = ld.as_list(prompt, n, self.default_prompts(n))
        with ld.eval_mode(pipe.unet), ld.stacked_loras(pipe, lora or [], own_lora, self.lora_rank > 0), \
                ld.sample_autocast(pipe.device, self.weight_dtype):
            out = pipe(prompts, height=self.image_size, width=self.image_size,
                       num_inference_steps=self.diffusion.check_steps(steps or self.sample_steps),
                       guidance_scale=self.guidance if guidance is None else guidance,
                       negative_prompt=[negative_prompt] * n if negative_prompt else None,
                       generator=ld.generators(n, seed), output_type="pt").images
        return out.float() * 2 - 1

    def export(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        unet = ld.unwrap(self.unet)
        if self.lora_rank > 0:
            ld.save_unet_lora(unet, out_dir)
            unet = ld.merged_copy(unet)
        self.pipeline(self.sampler_name, unet=unet).save_pretrained(out_dir)
        ld.write_export_info(out_dir, family="sd", base=ld.pipeline_location(self.base), lora_rank=self.lora_rank)

    # --- helpers -----------------------------------------------------------------------

    def pipeline(self, sampler: str, unet: nn.Module | None = None) -> StableDiffusionPipeline:
        """A diffusers pipeline over this family's (unwrapped) parts and the named sampler."""
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=ld.unwrap(self.text_encoder), tokenizer=self.tokenizer,
            unet=unet or ld.unwrap(self.unet), scheduler=self.diffusion.inference_scheduler(sampler),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def default_prompts(self, n: int) -> list[str]:
        if self._val_prompts is None:
            self._val_prompts = [item.get("caption", "") for item in ld.validation_items(self.validation_data, n)]
        return self._val_prompts


# configs/model/sd.yaml's `_target_` is the builder: the class it stands for declares the family (families/contract.py).
stable_diffusion.family = StableDiffusion
