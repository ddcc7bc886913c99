"""ControlNet: make a frozen Stable Diffusion (1.x/2.x or SDXL) base follow a sketch, optionally with LoRA.

`model.base` decides the kind (`families/base_kinds.py`): an SDXL base conditions the U-Net and
the ControlNet on its two text encoders and added time ids (`families/sdxl.py`). SD3.x and
Flux bases are transformers trained with flow matching: the builder `ControlNet(base=...)`
(the config's `_target_`) builds `families/flow_controlnet.py`'s `FlowControlNet` for them and
this module's `UNetControlNet` for SD and SDXL, so `model=controlnet` (and the saved configs of
old runs) reach both through the same `_target_`.

The ControlNet is `ControlNetModel.from_unet(base_unet)` (a trainable copy of the base's
encoder with zero-initialised output convolutions), its hint encoder downsampling the
sketch by the VAE's factor. The base VAE, text encoder and U-Net are frozen; on top:
- `lora.rank > 0`: LoRA adapters on the base U-Net train alongside the ControlNet;
- `control_lora.rank > 0` (Control-LoRA): the ControlNet copy itself is frozen and
  LoRA-adapted; only its LoRA, zero convolutions and hint encoder train.

On an SDXL base, `controlnet.union=true` trains a `ControlNetUnionModel` instead (several control
types in one model, each sample's control image under its configured slot: `families/controlnet_union.py`).

Exports `export/controlnet/` (a ControlNetModel or ControlNetUnionModel directory, Control-LoRA merged in),
`export/pytorch_lora_weights.safetensors` (the base U-Net's LoRA, for diffusers'
`load_lora_weights`), `export/control_lora.safetensors` (Control-LoRA's trainable
weights only) and `genlab_export.json` naming the base to load them onto.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, ControlNetUnionModel, StableDiffusionControlNetPipeline
from diffusers.training_utils import cast_training_params
from safetensors.torch import save_file

from genlab.data.latent_cache import cached_or_encoded_latents, cached_or_encoded_text
from genlab.errors import ConfigError, GenlabError
from genlab.families import base_kinds, controlnet_union, flow_controlnet, lora_variants, offload, quantize, sdxl
from genlab.families import latent_diffusion as ld
from genlab.families.contract import OnePhase
from genlab.families.controlnet_card import ControlNetFamily
from genlab.families.controlnet_options import ControlNetOptions
from genlab.families.qwen_image_controlnet import QwenImageControlNet
from genlab.families.sana_controlnet import SanaControlNet
from genlab.families.sketch_conditioned import SketchConditioned
from genlab.families.z_image_controlnet import ZImageControlNet
from genlab.families.sd import latent_diffusion_core, load_parts

#: The flow-matching kinds whose VAE, text encoder or packing is not SD3's or Flux's: their own FlowControlNet.
FLOW_FAMILIES = {"qwen-image": QwenImageControlNet, "z-image": ZImageControlNet, "sana": SanaControlNet}
HINT_CHANNELS = (16, 32, 96, 256)  # diffusers' default hint encoder (8x down, for SD's VAE)


def hint_channels(vae_factor: int, channels: list[int] | None) -> tuple[int, ...]:
    """Hint-encoder channels: one stride-2 stage per halving of the VAE, so the sketch lands on the latent grid."""
    stages = vae_factor.bit_length() - 1  # log2(factor)
    if channels is None:
        if stages >= len(HINT_CHANNELS):
            raise ConfigError(f"the VAE downsamples {vae_factor}x: set model.controlnet.conditioning_channels "
                              f"({stages + 1} entries).")
        return HINT_CHANNELS[: stages + 1]
    if len(channels) != stages + 1:
        raise ConfigError(f"model.controlnet.conditioning_channels={list(channels)}: the VAE downsamples "
                          f"{vae_factor}x, so the hint encoder needs {stages + 1} entries.")
    return tuple(channels)


def ControlNet(image_size: int, channels: int = 3, base: str | None = None,
               **keys: Any) -> UNetControlNet | flow_controlnet.FlowControlNet:
    """A sketch-conditioned ControlNet on a frozen base, of the class the base's kind needs.

    configs/model/controlnet.yaml's `_target_` (and the saved configs of old runs): an SD 1.x/2.x or
    SDXL base gets a `UNetControlNet`, an SD3.x or Flux base a `flow_controlnet.FlowControlNet`, from
    the same keys (`ControlNetOptions`).

    Args:
        image_size, channels: from the data.
        base: the base (hub id, diffusers pipeline dir, genlab sd run or single .safetensors file). Required.
        base_config: for a single-file base, a diffusers directory (or hub id) with its architecture's configs.
        vae: a VAE replacing the base's own (None: the base's; SD and SDXL only).
        controlnet: {conditioning_channels: hint encoder channels or None (from the VAE),
            pretrained: a ControlNetModel to start from instead of copying the U-Net, union: SDXL only, a
            ControlNetUnionModel, control_modes: the union's slot of each control}; SD3.x/Flux
            read num_layers and num_single_layers instead (`FlowControlNet`).
        lora: base U-Net LoRA {rank (0 = off), alpha (None = rank), variant (lora | dora | loha | lokr),
            target_modules, dropout}.
        control_lora: the same keys for Control-LoRA on the ControlNet (rank 0 = train it fully).
        gradient_checkpointing: recompute activations in ControlNet and U-Net backward passes.
        quantize_base: null | int8 | fp8 | int4: the frozen base U-Net's linear weights quantised (torchao, QLoRA-style).
        offload_base: null | cpu: the frozen base denoiser group-offloaded to host memory (families.offload; no LoRA on it).
        caption_dropout: the fraction of captions dropped (for classifier-free guidance).
        sampler, sample_steps, guidance, control_scale: sampling defaults.
        validation_data: the data config; its first val items are the fixed sample pairs.
        max_sequence_length: T5 prompt tokens, read by SD3.x/Flux bases only (SD's CLIP reads 77).
        **keys: any other key is the diffusion core's (`genlab.diffusion.Diffusion`): timesteps
            (cubic: mostly high noise, where the sketch decides the layout), weighting, snr_gamma,
            offset_noise. The schedule and objective are the base's.

    Returns:
        the family, a `UNetControlNet` or a `FlowControlNet`.
    """
    if not base:
        raise ConfigError("model.base: ControlNet needs a base (SD 1.x/2.x, SDXL, SD3.x or Flux): a hub id, a "
                          "diffusers directory, or an sd run (`genlab train model=sd model.vae=VAE_RUN data=...`).")
    options = ControlNetOptions.read(image_size, channels, base, keys)
    kind = base_kinds.base_kind(str(base))
    if options.controlnet.get("union") and kind != "sdxl":
        raise ConfigError(f"model.controlnet.union=true needs an SDXL base (diffusers' ControlNetUnionModel is "
                          f"SDXL's), but model.base={base} is {base_kinds.a_kind(kind)} base.")
    if kind in flow_controlnet.CLASSES:
        return FLOW_FAMILIES.get(kind, flow_controlnet.FlowControlNet)(options)
    return UNetControlNet(options)


class UNetControlNet(ControlNetFamily, OnePhase, SketchConditioned):
    """A trainable ControlNet on a frozen SD 1.x/2.x or SDXL U-Net (see the module docstring).

    Built by `ControlNet`, which reads the config's keys into `options` (their meaning: `ControlNet`'s Args).
    """

    def __init__(self, options: ControlNetOptions):
        o = options
        self.kind = base_kinds.require_kind(o.base, ("sd", "sdxl"), "UNetControlNet")
        self.image_size, self.vae_source = o.image_size, o.vae
        self.base = base_kinds.diffusers_dir(o.base, o.base_config)  # a single file: its converted directory
        self.union = bool(o.controlnet.get("union"))  # checked before the base is loaded
        self.control_modes = controlnet_union.control_modes(o.controlnet) if self.union else {}
        if self.union and int(o.control_lora.get("rank", 0)) > 0:
            raise ConfigError("model.control_lora.rank > 0 cannot adapt a union ControlNet (diffusers' "
                              "ControlNetUnionModel takes no LoRA adapters); train it whole with model.control_lora.rank=0.")
        self.text_encoder_2 = self.tokenizer_2 = None  # SDXL's second text encoder
        if self.kind == "sdxl":
            self.vae, (self.text_encoder, self.text_encoder_2), (self.tokenizer, self.tokenizer_2), self.unet = \
                sdxl.load_parts(self.base, self.vae_source)
        else:
            self.vae, self.text_encoder, self.tokenizer, self.unet = load_parts(
                self.base, self.vae_source, o.image_size, {}, {}, None)
        if o.channels != self.vae.config.in_channels:
            raise ConfigError(f"data.channels={o.channels}, but the VAE takes "
                              f"{self.vae.config.in_channels}-channel images.")
        self.diffusion = latent_diffusion_core(self.base, o.diffusion)
        cfg, lora, control_lora = o.controlnet, o.lora, o.control_lora

        # The ControlNet copies the U-Net *before* any LoRA is added to the U-Net.
        if cfg.get("pretrained"):
            self.controlnet = ld.load_pretrained(ControlNetUnionModel if self.union else ControlNetModel,
                                                 cfg["pretrained"], "controlnet")
        else:
            hint = hint_channels(ld.vae_factor(self.vae), cfg.get("conditioning_channels"))
            self.controlnet = (controlnet_union.from_unet(self.unet, hint) if self.union else
                               ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=hint))
            if not cfg.get("zero_init_hint", True):
                # The paper zero-initialises both the hint encoder's last conv and the zero convs, a
                # saddle that each escapes only once the other has grown ("sudden convergence").
                # The zero convs alone keep the base unchanged at step 0; a random hint conv lets
                # them see the sketch from the first step.
                self.controlnet.controlnet_cond_embedding.conv_out.reset_parameters()
        if self.union:
            controlnet_union.check_slots(self.control_modes, self.controlnet)
        self.unet.requires_grad_(False)
        lora_variants.refuse_on_quantized(lora, o.quantize_base)
        offload.check(o.offload_base, int(lora.get("rank", 0)), o.quantize_base)
        self.offload_base = o.offload_base
        quantize.quantize_frozen(self.unet, o.quantize_base)  # after the ControlNet copied the full-precision U-Net
        self.lora_rank = int(lora.get("rank", 0))
        if self.lora_rank > 0:
            self.unet.add_adapter(lora_variants.adapter_config(lora))
        self.control_lora_rank = int(control_lora.get("rank", 0))
        if self.control_lora_rank > 0:
            self.controlnet.requires_grad_(False)
            self.controlnet.add_adapter(ld.lora_config(control_lora))
            # Zero convolutions and the hint encoder are new to the base: they must train.
            cn = self.controlnet
            for part in (cn.controlnet_cond_embedding, cn.controlnet_down_blocks, cn.controlnet_mid_block):
                part.requires_grad_(True)
        if o.gradient_checkpointing:
            # The frozen U-Net too: gradients flow through it to the ControlNet's residuals.
            self.unet.enable_gradient_checkpointing()
            self.controlnet.enable_gradient_checkpointing()
        self.init_sampling(self.diffusion, o)
        self.weight_dtype = torch.float32

    # --- the Family protocol ------------------------------------------------------------

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: ld.StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = cached_or_encoded_latents(batch, self.vae, rng)  # (B, c, h, w)
        with torch.no_grad():
            captions = ld.drop_captions(batch["caption"], self.caption_dropout, rng)
            text = self.text_conditioning(batch, captions)  # encoder_hidden_states (B, 77, D) [+ SDXL's added]
        noisy, t, target, weight = self.diffusion.training_inputs(latents, rng)
        # Residuals for each U-Net down block and the middle block, from the sketch (B, 3, H, W) or a union's controls.
        down, mid = self.controlnet(noisy, t, **text, **self.control_inputs(batch, rng, noisy.dtype),
                                    return_dict=False)
        pred = self.unet(noisy, t, **text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        loss = self.diffusion.loss(pred, target, weight)
        return loss, {"loss": loss.detach()}

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "UNetControlNet":
        self.weight_dtype = ld.weight_dtype_for(device, dtype)
        for frozen in filter(None, (self.vae, self.text_encoder, self.text_encoder_2, self.unet)):
            if not offload.is_offloaded(frozen):  # an offloaded U-Net moves its groups itself
                ld.move(frozen, device, self.weight_dtype)
        offload.offload_frozen(self.unet, self.offload_base, device)
        quantize.set_dtype(self.unet, self.weight_dtype)  # a quantised U-Net's int8 layers hand on this dtype
        ld.move(self.controlnet, device, self.weight_dtype if self.control_lora_rank > 0 else torch.float32)
        # Trainable weights (LoRA, zero convs, hint encoder) stay fp32 under mixed precision.
        cast_training_params([self.unet, self.controlnet], torch.float32)
        return self

    @torch.no_grad()
    def sample(self, n: int, seed: int, sketch: Any = None, prompt: str | list[str] | None = None,
               sampler: str | None = None, steps: int | None = None,
               guidance: float | None = None, control_scale: float | None = None,
               lora: list[str | tuple[str, float]] | None = None, own_lora: float = 1.0,
               control_mode: str | int | None = None, **options: Any) -> torch.Tensor:
        """`n` images following `sketch` (path, PIL or tensor in [0, 1]) and `prompt`, (n, 3, H, W) in [-1, 1].

        With no sketch: the first val pairs of the training data (sketches and captions).
        `lora` stacks extra base U-Net LoRAs ("PATH[:weight]" or (path, weight)); `own_lora`
        weights this run's own (0 swaps it out). A union ControlNet reads `sketch` as the control
        `control_mode` names (a key of model.controlnet.control_modes or a slot; None: the first key).
        """
        if options or (control_mode is not None and not self.union):
            extra = sorted([*options, *(["control_mode"] if control_mode is not None else [])])
            raise GenlabError(f"controlnet: unknown sample option(s) {extra}; it takes sketch, prompt, "
                              f"sampler, steps, guidance, control_scale, lora, own_lora"
                              f"{', control_mode' if self.union else ''}.")
        name, slot = None, None
        if self.union:
            slots = ld.unwrap(self.controlnet).config.num_control_type
            name, slot = controlnet_union.sample_slot(control_mode, self.control_modes, slots)
        if self.union and sketch is None and name == "edges":  # the val pairs' control: the edges of their images
            pairs = self.validation_pairs(n)
            sketch = controlnet_union.control_images(["edges"] * len(pairs), {
                key: torch.stack([item[key] for item in pairs]) for key in ("sketch", "image")})
        sketches, prompts = self.sample_conditions(n, sketch, prompt)
        pipe = self.pipeline(sampler or self.sampler_name)
        control = ({"control_image": sketches.to(pipe.device), "control_mode": slot} if self.union else
                   {"image": sketches.to(pipe.device)})
        with ld.eval_mode(pipe.unet, pipe.controlnet), ld.sample_autocast(pipe.device, self.weight_dtype), \
                ld.stacked_loras(pipe, lora or [], own_lora, self.lora_rank > 0):
            out = pipe(prompts, **control, height=self.image_size, width=self.image_size,
                       num_inference_steps=self.diffusion.check_steps(steps or self.sample_steps),
                       guidance_scale=self.guidance if guidance is None else guidance,
                       controlnet_conditioning_scale=self.control_scale if control_scale is None else control_scale,
                       generator=ld.generators(n, seed), output_type="pt").images
        return out.float() * 2 - 1

    def export(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        controlnet = ld.unwrap(self.controlnet)
        if self.control_lora_rank > 0:
            small = {k: p.detach().float().cpu().contiguous()
                     for k, p in controlnet.named_parameters() if p.requires_grad}
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file(small, out_dir / "control_lora.safetensors")
            controlnet = ld.merged_copy(controlnet)
        controlnet.save_pretrained(out_dir / "controlnet")
        if self.lora_rank > 0:
            lora_variants.save(self.unet, out_dir)
        ld.write_export_info(out_dir, family="controlnet", base_kind=self.kind, base=ld.pipeline_location(self.base),
                             vae=ld.pipeline_location(self.vae_source), lora_rank=self.lora_rank,
                             control_lora_rank=self.control_lora_rank, controlnet_class=type(controlnet).__name__,
                             **({"control_modes": self.control_modes} if self.union else {}))

    # --- helpers -----------------------------------------------------------------------

    def text_conditioning(self, batch: dict[str, Any], captions: list[str]) -> dict[str, Any]:
        """The U-Net's and ControlNet's text inputs: SD's hidden states (cached when the batch names a
        cache), or SDXL's two encoders' with their added conditioning (encoded each step)."""
        if self.kind == "sdxl":
            return sdxl.encode_prompt([self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2],
                                      captions, self.image_size)
        return {"encoder_hidden_states": cached_or_encoded_text(batch, captions, self.tokenizer, self.text_encoder)}

    def control_inputs(self, batch: dict[str, Any], rng: ld.StepRandom, dtype: torch.dtype) -> dict[str, Any]:
        """The ControlNet's control keywords: the sketch (B, 3, H, W), or for a union each sample's control
        image with its slot (`controlnet_union.training_controls`, drawn after the diffusion core's draws)."""
        if not self.union:
            return {"controlnet_cond": batch["sketch"]}
        images, slots = controlnet_union.training_controls(batch, self.control_modes, rng)
        num = ld.unwrap(self.controlnet).config.num_control_type
        return controlnet_union.union_inputs(images, slots, num, dtype)

    def pipeline(self, sampler: str) -> StableDiffusionControlNetPipeline:
        """A diffusers ControlNet pipeline over this family's (unwrapped) parts and the named sampler."""
        if self.kind == "sdxl":
            pipe = sdxl.controlnet_pipeline(
                self.base, self.vae, [self.text_encoder, self.text_encoder_2], [self.tokenizer, self.tokenizer_2],
                ld.unwrap(self.unet), ld.unwrap(self.controlnet), self.diffusion.inference_scheduler(sampler),
                union=self.union)
            pipe.set_progress_bar_config(disable=True)
            return pipe
        pipe = StableDiffusionControlNetPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=ld.unwrap(self.unet),
            controlnet=ld.unwrap(self.controlnet), scheduler=self.diffusion.inference_scheduler(sampler),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


# configs/model/controlnet.yaml's `_target_` is the builder; the class it stands for declares the family's
# name and losses (families/declarations.py), which FlowControlNet shares through ControlNetFamily.
ControlNet.family = UNetControlNet
