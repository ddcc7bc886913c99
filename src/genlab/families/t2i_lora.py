"""Text-to-image LoRA on any base kind: `genlab train model=lora model.base=BASE data=...`.

A frozen base (SD 1.x/2.x, SDXL, SD3.x, Flux, Qwen-Image, Z-Image or Flux.2 [klein]: `families/base_kinds.py`) whose
denoiser (U-Net or transformer) gets a peft adapter (`model.lora`, any variant of `lora_variants`); the
VAE and text encoders stay frozen. Each kind is trained on what its plain diffusers text-to-image
pipeline feeds the denoiser, with the pieces the ControlNet families use for the same base
(`flow_controlnet`, `qwen_image_controlnet`, `z_image_controlnet`, `sdxl`): the prompt encoding, the
latents' normalisation and packing, the objective and shift of the base's scheduler. Sampling is
that plain pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`,
`FluxPipeline`, `QwenImagePipeline`, `ZImagePipeline`, `Flux2KleinPipeline`) over the base's parts and the adapted denoiser,
so an export loaded by the pipeline's `load_lora_weights` samples genlab's images.

Exports `pytorch_lora_weights.safetensors` (diffusers' layout; lora and dora), `lora_kohya.safetensors`
(kohya/ComfyUI keys, every variant), a transformer's LoHa/LoKr as peft's `transformer_adapter/`, and
genlab_export.json naming the base.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers.training_utils import cast_training_params
from torch import nn

from genlab.data.latent_cache import cached_or_encoded_latents, cached_or_encoded_text
from genlab.diffusion import Diffusion
from genlab.errors import ConfigError, GenlabError
from genlab.families import base_kinds, flow_controlnet, flux2_klein_parts, lora_variants, qwen_image_controlnet, sdxl
from genlab.families import latent_diffusion as ld
from genlab.families import z_image_controlnet, z_image_parts
from genlab.families.contract import Card, OnePhase
from genlab.families.controlnet_card import CONTROLNET_BASES, LORA_ONLY_TAGS, UNET_KINDS, controlnet_adapter
from genlab.families.sd import latent_diffusion_core

#: The base kinds model=lora trains (Sana's DPM-Solver pipeline is not among them yet).
KINDS = ("sd", "sdxl", "sd3", "flux", "qwen-image", "z-image", "flux2-klein")


class TextToImageLoRA(OnePhase):
    """A LoRA (or DoRA, LoHa, LoKr) on a frozen text-to-image base's denoiser (see the module docstring).

    Args:
        image_size, channels: from the data.
        base: the base (hub id, diffusers pipeline dir, genlab run or single .safetensors file). Required.
        base_config: for a single-file base, a diffusers directory (or hub id) with its architecture's configs.
        lora: {rank (> 0), alpha (None = rank), variant (lora | dora | loha | lokr), target_modules, dropout}.
        gradient_checkpointing: recompute the denoiser's activations in the backward pass.
        caption_dropout: the fraction of captions dropped (for classifier-free guidance).
        sampler, sample_steps, guidance: sampling defaults (guidance as the ControlNet families read it:
            Flux's guidance embedding, Qwen-Image's true CFG, Z-Image's w with 1 = off).
        max_sequence_length: prompt tokens of the transformer kinds' text encoders (None: the pipeline's).
        validation_data: the data config; its first val captions are the default prompts.
        **diffusion: the diffusion core's keys (timesteps, weighting, snr_gamma, offset_noise); the schedule,
            objective and shift are the base's.
    """

    name = "lora"
    card = Card(what="a LoRA for a text-to-image base (pytorch_lora_weights.safetensors)", title="lora",
                library_name="diffusers", pipeline_tag="text-to-image", tags=("diffusers", "text-to-image"))
    losses = ("loss",)
    metrics: dict[str, str] = {}
    #: sample() options genlab eval fills from validation items.
    conditions = ("prompt",)

    def __init__(self, image_size: int, channels: int = 3, base: str | None = None, base_config: str | None = None,
                 lora: Mapping[str, Any] | None = None, gradient_checkpointing: bool = False,
                 caption_dropout: float = 0.1, sampler: str | None = None, sample_steps: int = 25,
                 guidance: float = 5.0, max_sequence_length: int | None = None, validation_data: Any = None,
                 **diffusion: Any):
        if not base:
            raise ConfigError("model.base: model=lora needs a base to adapt (SD 1.x/2.x, SDXL, SD3.x, Flux, "
                              "Qwen-Image, Z-Image or Flux.2 [klein]): a hub id, a diffusers directory or a genlab run.")
        self.kind = base_kinds.require_kind(str(base), KINDS, "model=lora")
        self.lora = ld.plain(lora) or {}
        self.lora_rank = int(self.lora.get("rank", 0))
        if self.lora_rank <= 0:
            raise ConfigError(f"model.lora.rank={self.lora_rank}: model=lora trains only the adapter; set a rank > 0.")
        self.image_size = image_size
        self.base = base_kinds.diffusers_dir(str(base), base_config)
        self.pipe = flow_controlnet.base_pipeline(self.kind, str(base), self.base)
        self.pipe.set_progress_bar_config(disable=True)
        self.denoiser_name = "unet" if self.kind in UNET_KINDS else "transformer"
        # The loop wraps the trained network under this attribute (DDP, compile); the pipeline keeps the bare one.
        setattr(self, self.denoiser_name, getattr(self.pipe, self.denoiser_name))
        self.vae = self.pipe.vae
        for module in self.pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()
        vae_channels, factor = self.vae_shape()
        if channels != vae_channels:
            raise ConfigError(f"data.channels={channels}, but the VAE takes {vae_channels}-channel images.")
        if self.kind not in UNET_KINDS and image_size % (2 * factor):  # 2x2 latent patches
            raise ConfigError(f"data.image_size={image_size}: use a multiple of {2 * factor} for this base's VAE.")
        self.denoiser.add_adapter(lora_variants.adapter_config(self.lora))  # only the adapter trains
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        if self.kind in UNET_KINDS:
            self.diffusion = latent_diffusion_core(self.base, diffusion)
            self.text_tokens = None
        else:
            tokens = (image_size // factor // 2) ** 2  # the transformer's sequence length (2x2 latent patches)
            scheduler = flow_controlnet.training_scheduler(self.base, tokens)
            if self.kind == "flux2-klein":  # its pipeline's shift also depends on the sampling steps
                scheduler = type(scheduler).from_config(
                    scheduler.config, shift=flux2_klein_parts.training_shift(tokens, sample_steps))
            self.diffusion = Diffusion.build(scheduler, **diffusion)
            self.text_tokens = max_sequence_length or flow_controlnet.text_tokens(self.kind, self.pipe.components)
        self.ema_network, self.num_classes, self.caption_dropout = None, None, caption_dropout
        self.sampler_name = self.check_sampler(sampler or self.diffusion.default_sampler())
        self.sample_steps, self.guidance, self.validation_data = sample_steps, guidance, validation_data
        self._val_prompts: list[str] | None = None
        self.weight_dtype = torch.float32

    @property
    def denoiser(self) -> nn.Module:
        """The base's U-Net or transformer, carrying the adapter (as the loop may have wrapped it)."""
        return getattr(self, self.denoiser_name)

    @classmethod
    def card_for(cls, model: Mapping[str, Any], export: Mapping[str, Any] | None = None) -> Card:
        """The card by the base's kind (from genlab_export.json), with the code that loads the LoRA onto it."""
        return lora_card(model, export or {})

    # --- the Family protocol ------------------------------------------------------------

    def networks(self) -> dict[str, nn.Module]:
        return {self.denoiser_name: self.denoiser}

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: ld.StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "caption" not in batch:
            raise GenlabError("model=lora trains on captions and this data has none: use data=fill_circles, data=shards "
                              "packed with captions (genlab data pack), sketch_folder or sketch_hf.")
        latents = self.latents(batch, rng)  # (B, c, h, w), normalised as the pipeline decodes them
        with torch.no_grad():
            text = self.encode(batch, ld.drop_captions(batch["caption"], self.caption_dropout, rng))
        noisy, t, target, weight = self.diffusion.training_inputs(latents, rng)
        pred, target = self.predict(noisy, t, text, target)
        loss = self.diffusion.loss(pred, target, weight)
        return loss, {"loss": loss.detach()}

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "TextToImageLoRA":
        self.weight_dtype = ld.weight_dtype_for(device, dtype)
        for module in self.pipe.components.values():  # the bare denoiser among them
            if isinstance(module, nn.Module):
                ld.move(module, device, self.weight_dtype)
        cast_training_params(self.denoiser, torch.float32)  # the adapter stays fp32 under mixed precision
        return self

    @torch.no_grad()
    def sample(self, n: int, seed: int, prompt: str | list[str] | None = None, sampler: str | None = None,
               steps: int | None = None, guidance: float | None = None,
               lora: list[str | tuple[str, float]] | None = None, own_lora: float = 1.0,
               **options: Any) -> torch.Tensor:
        """`n` images for `prompt` (default: captions of the first val items), (n, 3, H, W) in [-1, 1].

        The base's plain pipeline with the trained adapter; `lora` stacks extra LoRAs of the base's kind
        ("PATH[:weight]" or (path, weight)), `own_lora` weights this run's own (0: the base as it was).
        """
        if options:
            raise GenlabError(f"lora ({base_kinds.KINDS[self.kind]} base): unknown sample option(s) "
                              f"{sorted(options)}; it takes prompt, sampler, steps, guidance, lora, own_lora.")
        pipe = self.pipeline(sampler or self.sampler_name)
        prompts = ld.as_list(prompt, n, self.default_prompts(n))
        tokens = {} if self.text_tokens is None else {"max_sequence_length": self.text_tokens}
        with ld.eval_mode(getattr(pipe, self.denoiser_name)), ld.sample_autocast(pipe.device, self.weight_dtype), \
                ld.stacked_loras(pipe, lora or [], own_lora, True, denoiser=self.denoiser_name):
            out = pipe(prompt=prompts, height=self.image_size, width=self.image_size,
                       num_inference_steps=self.diffusion.check_steps(steps or self.sample_steps),
                       **self.call_options(n, self.guidance if guidance is None else guidance), **tokens,
                       generator=ld.generators(n, seed), output_type="pt").images
        return out.float() * 2 - 1

    def export(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        denoiser = ld.unwrap(self.denoiser)
        if self.kind in UNET_KINDS:
            lora_variants.save(denoiser, out_dir)
        else:
            flow_controlnet.save_transformer_adapter(self.kind, denoiser, out_dir)
        ld.write_export_info(out_dir, family="lora", base_kind=self.kind, base=ld.pipeline_location(self.base),
                             lora_rank=self.lora_rank, variant=self.lora.get("variant") or "lora",
                             max_sequence_length=self.text_tokens)

    # --- the base kind's inputs, as its pipeline makes them -----------------------------

    def latents(self, batch: dict[str, Any], rng: ld.StepRandom) -> torch.Tensor:
        """The batch's images as the latents the pipeline decodes (posterior samples drawn from `rng`)."""
        if self.kind in UNET_KINDS:
            return cached_or_encoded_latents(batch, self.vae, rng)  # z * scale
        if self.kind == "qwen-image":
            if batch.get("latent_cache"):
                raise GenlabError("data.cache_latents: the latent cache holds 2D VAEs' posteriors, not Qwen-Image's "
                                  "video VAE's; set data.cache_latents=false.")
            return qwen_image_controlnet.sampled_latents(self.vae, batch["image"], rng)
        if self.kind == "flux2-klein":
            if batch.get("latent_cache"):
                raise GenlabError("data.cache_latents: Flux.2 [klein] latents are normalised by its VAE's batch-norm "
                                  "statistics after patching, which the cache does not hold; set data.cache_latents=false.")
            return flux2_klein_parts.sampled_latents(self.vae, batch["image"], rng)
        return flow_controlnet.shifted_latents(self.vae, batch, rng)  # (z - shift) * scale

    def encode(self, batch: dict[str, Any], captions: list[str]) -> dict[str, Any]:
        """The denoiser's text inputs for `captions`, as the kind's pipeline encodes prompts."""
        pipe = self.pipe
        if self.kind == "sd":
            return {"encoder_hidden_states": cached_or_encoded_text(batch, captions, pipe.tokenizer, pipe.text_encoder)}
        if self.kind == "sdxl":
            return sdxl.encode_prompt([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                      captions, self.image_size)
        if self.kind == "qwen-image":
            return qwen_image_controlnet.encode_prompt(pipe, captions, self.text_tokens)
        if self.kind == "z-image":
            return z_image_controlnet.encode_prompt(pipe, captions, self.text_tokens)
        if self.kind == "flux2-klein":
            return flux2_klein_parts.encode_prompt(pipe, captions, self.text_tokens)
        return flow_controlnet.encode_prompt(self.kind, pipe, captions, self.text_tokens)

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, text: dict,
                target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) in the layout the denoiser predicts in (Flux, Qwen-Image: packed tokens)."""
        denoiser = self.denoiser
        if self.kind in UNET_KINDS:
            return denoiser(noisy, t, **text).sample, target
        if self.kind == "sd3":
            return denoiser(hidden_states=noisy, timestep=t, **text, return_dict=False)[0], target
        if self.kind == "flux":
            guidance = flow_controlnet.flux_guidance(ld.unwrap(denoiser), len(noisy), self.guidance, noisy.device)
            pred = denoiser(**flow_controlnet.flux_inputs(noisy, t, text), guidance=guidance, return_dict=False)[0]
            return pred, flow_controlnet.pack(target)
        if self.kind == "qwen-image":
            pred = denoiser(**qwen_image_controlnet.transformer_inputs(noisy, t, text), return_dict=False)[0]
            return pred, flow_controlnet.pack(target)
        if self.kind == "flux2-klein":
            pred = denoiser(**flux2_klein_parts.transformer_inputs(noisy, t, text), return_dict=False)[0]
            return pred, flux2_klein_parts.pack(target)
        return z_image_parts.velocity(None, denoiser, noisy, t, text["cap_feats"], None), target

    def vae_shape(self) -> tuple[int, int]:
        """(image channels, downsampling factor) of the base's VAE."""
        if self.kind == "qwen-image":
            return qwen_image_controlnet.vae_shape(self.vae)
        return self.vae.config.in_channels, ld.vae_factor(self.vae)

    def call_options(self, n: int, guidance: float) -> dict[str, Any]:
        """`model.guidance` as the kind's pipeline takes it."""
        if self.kind == "qwen-image":
            return qwen_image_controlnet.call_options(n, guidance)
        if self.kind == "z-image":
            return z_image_controlnet.call_options(n, guidance)
        return {"guidance_scale": guidance}  # CFG; Flux: its guidance embedding, as in training

    # --- helpers -----------------------------------------------------------------------

    def check_sampler(self, sampler: str) -> str:
        """The sampler, if the diffusion core has it and the kind's pipeline can run it."""
        if self.kind in flow_controlnet.EULER_ONLY and sampler != "euler":
            raise GenlabError(f"--sampler {sampler}: {base_kinds.PIPELINE_CLASSES[self.kind]} hands its sampler "
                              "custom sigmas, which only euler takes; use --sampler euler.")
        return self.diffusion.check_sampler(sampler)

    def pipeline(self, sampler: str):
        """The base's plain pipeline over its parts and the adapted denoiser, with the named sampler."""
        self.pipe.scheduler = self.diffusion.inference_scheduler(self.check_sampler(sampler))
        setattr(self.pipe, self.denoiser_name, ld.unwrap(self.denoiser))
        return self.pipe

    def default_prompts(self, n: int) -> list[str]:
        if self._val_prompts is None or len(self._val_prompts) < n:
            self._val_prompts = [item.get("caption", "") for item in ld.validation_items(self.validation_data, n)]
        return self._val_prompts


def lora_card(model: Mapping[str, Any], export: Mapping[str, Any]) -> Card:
    """The card of a model=lora run: tagged by its base's kind, with the code that loads it in that kind's pipeline."""
    kind = export.get("base_kind") if export.get("base_kind") in KINDS else None
    if kind is None:
        try:
            kind = base_kinds.base_kind(str(model.get("base")))
        except (GenlabError, OSError, ValueError):  # a hub id offline
            return TextToImageLoRA.card
    tag = LORA_ONLY_TAGS[kind] if kind in LORA_ONLY_TAGS else CONTROLNET_BASES[kind][0]
    pipeline = base_kinds.PIPELINE_CLASSES[kind]
    adapter, lines = controlnet_adapter(kind, model.get("lora"), "{where}")
    base = export.get("base") or model.get("base") or "BASE"
    tokens = export.get("max_sequence_length")
    call = "".join([f", {guidance_keywords(kind, float(model.get('guidance') or 5.0))}",
                    f", max_sequence_length={tokens}" if tokens else ""])
    use = "\n".join([f"from diffusers import {pipeline}", "",
                     f'pipe = {pipeline}.from_pretrained("{base}"{", text_encoder_3=None, tokenizer_3=None" if _no_t5(base) else ""})',
                     *lines,
                     f'image = pipe("a red circle on a blue background"{call}).images[0]'])
    return replace(TextToImageLoRA.card, what=f"{adapter or 'a LoRA'} for its {base_kinds.KINDS[kind]} base",
                   tags=("diffusers", tag, "text-to-image", f"diffusers:{pipeline}"), use=use)


def guidance_keywords(kind: str, guidance: float) -> str:
    """`model.guidance` as the kind's pipeline call takes it, written out for a model card."""
    if kind == "qwen-image":
        return f'true_cfg_scale={guidance}, negative_prompt=""' if guidance > 1 else "true_cfg_scale=1.0"
    if kind == "z-image":
        return f"guidance_scale={guidance - 1}"
    return f"guidance_scale={guidance}"


def _no_t5(base: str) -> bool:
    """Whether an SD3 base lists no T5 (a genlab sd3 run), which diffusers then wants passed as None."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(str(base)).get("text_encoder_3") == [None, None]
    except (OSError, ValueError):
        return False
