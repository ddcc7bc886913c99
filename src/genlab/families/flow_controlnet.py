"""ControlNets for the transformer bases trained with flow matching: SD3.x and Flux.

`genlab train model=controlnet model.base=<SD3.x or Flux base>` trains `FlowControlNet`
(the builder `controlnet.ControlNet` picks it for these bases). The ControlNet is built from the base's own
transformer (diffusers' `SD3ControlNetModel.from_transformer`, `FluxControlNetModel.from_transformer`:
a copy of its first blocks with zero-initialised outputs); the VAE, text encoders and
transformer are frozen, with optional LoRA (or DoRA, LoHa, LoKr: `model.lora.variant`) on the
transformer's attention projections. The objective is the core's flow matching
(`genlab.diffusion`: velocity target, timesteps shifted by the base scheduler's shift).

Training feeds every network what the diffusers ControlNet pipelines feed it at sample time,
so a plain-diffusers user of the export gets the images genlab samples:
- the sketch enters as the VAE latents of the control image (the pipelines encode it);
  SD3's ControlNet adds them through a zero-initialised patch embedding, Flux's reads packed
  2x2 latent patches through a zero-initialised linear layer;
- SD3: prompts from the pipeline's `encode_prompt`, the ControlNet's block outputs go to the
  transformer as `block_controlnet_hidden_states`;
- Flux: packed latents, image and text position ids, timesteps in [0, 1], the guidance
  embedding (`model.guidance`) where the base has one, and `controlnet_block_samples` /
  `controlnet_single_block_samples`.

Exports `export/controlnet/` (a diffusers model directory), the transformer's adapter (see
`save_transformer_adapter`) and `genlab_export.json`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import cast_training_params
from safetensors.torch import save_file
from torch import nn

from genlab.data.latent_cache import cached_or_encoded_latents
from genlab.diffusion import Diffusion
from genlab.errors import ConfigError, GenlabError
from genlab.families import base_kinds, lora_variants, offload, quantize, z_image_parts
from genlab.families import latent_diffusion as ld
from genlab.families.contract import OnePhase
from genlab.families.controlnet_card import ControlNetFamily
from genlab.families.controlnet_options import ControlNetOptions
from genlab.families.sketch_conditioned import SketchConditioned

# (ControlNet class, transformer class, ControlNet pipeline class) per base kind, by name in diffusers.
CLASSES = {"sd3": ("SD3ControlNetModel", "SD3Transformer2DModel", "StableDiffusion3ControlNetPipeline"),
           "flux": ("FluxControlNetModel", "FluxTransformer2DModel", "FluxControlNetPipeline"),
           "qwen-image": ("QwenImageControlNetModel", "QwenImageTransformer2DModel", "QwenImageControlNetPipeline"),
           "z-image": ("ZImageControlNetModel", "ZImageTransformer2DModel", "ZImageControlNetPipeline"),
           "sana": ("SanaControlNetModel", "SanaTransformer2DModel", "SanaControlNetPipeline")}
#: The pipelines' default `max_sequence_length` (prompt tokens), used when model.max_sequence_length is null.
TEXT_TOKENS = {"sd3": 256, "flux": 512, "qwen-image": 512, "z-image": 512, "sana": 300, "flux2-klein": 512}
#: Blocks a ControlNet copies when model.controlnet.num_layers is null: Flux 4 (diffusers' train_controlnet_flux.py),
#: Qwen-Image 5 (InstantX's Qwen-Image ControlNets), Sana 7 (diffusers' SanaControlNetModel default, its ControlNet+).
COPIED_BLOCKS = {"flux": 4, "qwen-image": 5, "sana": 7}
#: The kinds whose ControlNet pipeline hands its sampler custom sigmas, which only euler takes.
EULER_ONLY = ("flux", "qwen-image", "z-image", "flux2-klein")


def text_tokens(kind: str, parts: dict[str, Any]) -> int:
    """The T5 prompt tokens a base was trained with, when model.max_sequence_length does not say.

    An SD3 base without T5 (a genlab `model=sd3` run) sees the pipeline's zero stand-in for the T5
    tokens, as many as max_sequence_length asks for; the MMDiT attends to them, so the ControlNet
    must use the count the base was trained with (`sd3.T5_TOKENS`), not the pipeline's 256.
    """
    from genlab.families.sd3 import T5_TOKENS

    if kind == "sd3" and parts.get("text_encoder_3") is None:
        return T5_TOKENS
    return TEXT_TOKENS[kind]


def _diffusers(name: str):
    import diffusers

    return getattr(diffusers, name)


def build_controlnet(base: str, num_layers: int | None = None, num_single_layers: int | None = None) -> nn.Module:
    """The ControlNet of a flow-matching base (`CLASSES`): its transformer's first `num_layers` blocks, copied.

    Args:
        base: the base (anything `model.base` takes).
        num_layers: joint (MMDiT) blocks to copy; None: SD3 half of them (the SD3.5 Large ControlNets
            copy 19 of 38; the last block, which reads but no longer updates the text, cannot be
            copied), Flux 4 (as diffusers' train_controlnet_flux.py), Qwen-Image 5 (at most the base's own).
        num_single_layers: Flux's single-stream blocks to copy; None: 0 (the same recipe).
    """
    kind = base_kinds.require_kind(str(base), tuple(CLASSES), "a flow-matching ControlNet")
    transformer = ld.load_pretrained(_diffusers(CLASSES[kind][1]), base_kinds.diffusers_dir(str(base)), "transformer")
    return controlnet_for(kind, transformer, num_layers, num_single_layers)


def controlnet_for(kind: str, transformer: nn.Module, num_layers: int | None = None,
                   num_single_layers: int | None = None) -> nn.Module:
    """`build_controlnet` on a transformer in hand (also on the meta device, for sizes)."""
    controlnet_cls = _diffusers(CLASSES[kind][0])
    if kind == "z-image":  # control blocks beside the base's, sharing its embedders (z_image_parts)
        if num_single_layers:
            raise ConfigError(f"model.controlnet.num_single_layers={num_single_layers}: Z-Image has no "
                              "single-stream blocks of its own kind; set it to null.")
        return z_image_parts.controlnet_for(transformer, num_layers)
    if kind == "sd3":
        num_layers = num_layers or max(1, transformer.config.num_layers // 2)
        if num_layers >= transformer.config.num_layers:  # its last block no longer updates the text: no copy
            raise ConfigError(f"model.controlnet.num_layers={num_layers}: an SD3 ControlNet copies blocks before the "
                              f"base's last, and this base has {transformer.config.num_layers}; copy fewer, or "
                              "use a base with at least 2 blocks.")
        # Build from a copy of the config: from_transformer writes into the one it is given.
        return controlnet_cls.from_transformer(_ConfigCopy(transformer), num_extra_conditioning_channels=0,
                                               num_layers=num_layers)
    config = transformer.config
    # More blocks than the base has would be random, not copies, and the base reads only its own count.
    sizes = dict(num_layers=num_layers or min(COPIED_BLOCKS[kind], config.num_layers),
                 attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads)
    if kind == "flux":
        return controlnet_cls.from_transformer(transformer, num_single_layers=num_single_layers or 0, **sizes)
    if num_single_layers:
        raise ConfigError(f"model.controlnet.num_single_layers={num_single_layers}: {base_kinds.KINDS[kind]} has no "
                          "single-stream blocks; set it to null.")
    if kind == "sana":  # no from_transformer: the same config, the first blocks' weights copied (the rest zero)
        controlnet = controlnet_cls.from_config({**transformer.config, "num_layers": sizes["num_layers"]})
        controlnet.load_state_dict(transformer.state_dict(), strict=False)  # the base's later blocks are not here
        return controlnet
    return controlnet_cls.from_transformer(transformer, **sizes)


class _ConfigCopy:
    """A transformer seen through a writable copy of its config (for SD3's `from_transformer`)."""

    def __init__(self, transformer: nn.Module):
        self._transformer, self.config = transformer, dict(transformer.config)

    def __getattr__(self, name):
        return getattr(self._transformer, name)


def export(controlnet: nn.Module, out_dir: Path) -> Path:
    """`out_dir/controlnet/`: a diffusers model directory its ControlNet pipeline loads."""
    target = Path(out_dir) / "controlnet"
    ld.unwrap(controlnet).save_pretrained(target)
    return target


def from_pretrained(cls_name: str, location: str, **parts: Any):
    """`<cls_name>.from_pretrained(location, **parts)`, also for an SD3 base without T5.

    A genlab `model=sd3` export lists text_encoder_3 / tokenizer_3 as null in its model_index.json,
    and diffusers refuses to load a pipeline with a required part null unless it is passed as None.
    """
    cls = _diffusers(cls_name)
    absent = {name: None for name, entry in cls.load_config(location).items() if entry == [None, None]}
    return cls.from_pretrained(location, **{**absent, **parts})


def pipeline(base: str, controlnet: nn.Module):
    """The diffusers ControlNet pipeline of the base's kind over the base's parts and `controlnet`."""
    kind = base_kinds.base_kind(str(base))
    pipe = from_pretrained(CLASSES[kind][2], ld.pipeline_location(base_kinds.diffusers_dir(str(base))),
                           controlnet=ld.unwrap(controlnet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def training_scheduler(base: str, latent_tokens: int):
    """The base's flow scheduler, its shift the one its pipeline samples `latent_tokens` image tokens with.

    SD3 has one fixed shift (3.0). Flux shifts by exp(mu), mu growing with the token count
    (`use_dynamic_shifting`); its config's `shift` is then unused by sampling, so it is set to
    exp(mu) at the training resolution, where the core's timestep sampling reads it.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = ld.base_scheduler(base)
    config = scheduler.config
    if config.get("prediction_type") == "flow_prediction":  # Sana's DPM-Solver over flow sigmas, shifted as a flow one
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps, shift=config.flow_shift)
    if not config.get("use_dynamic_shifting"):
        return scheduler
    mu = calculate_shift(latent_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return type(scheduler).from_config(config, shift=math.exp(mu))


def save_transformer_adapter(kind: str, transformer: nn.Module, out_dir: Path) -> None:
    """The transformer's adapter, in every format its variant has a loader for.

    - lora, dora: `pytorch_lora_weights.safetensors`, for the pipelines' `load_lora_weights`;
    - loha, lokr (which those loaders refuse): `transformer_adapter/`, peft's adapter directory, for
      `PeftModel.from_pretrained(pipe.transformer, "<export>/transformer_adapter")` (it adapts the
      pipeline's transformer in place);
    - all: `lora_kohya.safetensors`, ComfyUI's keys (`lora_variants`).
    """
    from peft.utils import get_peft_model_state_dict

    transformer = ld.unwrap(transformer)
    config = transformer.peft_config["default"]
    layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    if lora_variants.variant_of(transformer) in lora_variants.DIFFUSERS_LOADABLE:
        # The metadata carries lora_alpha (and use_dora), so loaders scale by alpha / rank as in training.
        _diffusers(base_kinds.PIPELINE_CLASSES[kind]).save_lora_weights(
            out_dir, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict())
    else:
        adapter = Path(out_dir) / "transformer_adapter"
        config.save_pretrained(adapter)
        # PeftModel's own key prefix: its from_pretrained reads keys as PeftModel.save_pretrained writes them.
        save_file({f"base_model.model.{k}": v for k, v in layers.items()}, adapter / "adapter_model.safetensors")
    lora_variants.save_kohya(transformer, out_dir, prefix="lora_transformer_")


def refuse_unet_only_keys(options: ControlNetOptions, kind: str) -> None:
    """One ConfigError sentence for a key only SD/SDXL ControlNets read: model.vae, Control-LoRA, a hint encoder."""
    if options.vae:
        raise ConfigError(f"model.vae={options.vae}: {base_kinds.a_kind(kind)} ControlNet uses its base's own "
                          "VAE; set model.vae=null.")
    if int(options.control_lora.get("rank", 0)) > 0:
        raise ConfigError("model.control_lora.rank > 0: Control-LoRA is for SD and SDXL bases; set "
                          "model.control_lora.rank=0 to train the whole SD3.x/Flux ControlNet.")
    if options.controlnet.get("conditioning_channels"):
        raise ConfigError("model.controlnet.conditioning_channels: SD3.x/Flux ControlNets read the sketch's VAE "
                          "latents (no hint encoder); set it to null.")


def base_parts(kind: str, base: str, location: str) -> dict[str, Any]:
    """The base's own parts (text encoders, tokenizers, VAE, transformer) as its pipeline loads them,
    without the scheduler (the core's samplers replace it). `location`: `base`'s diffusers directory."""
    parts = base_pipeline(kind, base, location).components
    parts.pop("scheduler")
    return parts


def base_pipeline(kind: str, base: str, location: str):
    """The base's plain text-to-image pipeline of its kind (`base_kinds.PIPELINE_CLASSES`), loaded from `location`."""
    try:
        return from_pretrained(base_kinds.PIPELINE_CLASSES[kind], ld.pipeline_location(location))
    except (OSError, ValueError) as e:
        raise GenlabError(f"model.base={base}: cannot load it as {base_kinds.a_kind(kind)} pipeline "
                          f"({str(e).splitlines()[0]}).") from e


class FlowControlNet(ControlNetFamily, OnePhase, SketchConditioned):
    """A trainable ControlNet on a frozen SD3.x or Flux base, trained by flow matching (see the module docstring).

    Takes `configs/model/controlnet.yaml`'s keys (`ControlNet` reads them into `options`). What differs from
    SD/SDXL: the sketch is encoded by the VAE (no hint encoder: controlnet.conditioning_channels
    must be null), LoRA and its variants are on the transformer, there is no Control-LoRA and no
    `model.vae` override, and `guidance` is Flux's guidance embedding where the base has one.

    Args (beyond ControlNet's):
        controlnet: {pretrained: a ControlNet of the base's kind to start from, num_layers: joint
            blocks copied (None: SD3 half, Flux 4), num_single_layers: Flux single blocks copied (None: 0)}.
        max_sequence_length: T5 prompt tokens in training and sampling (None: the pipeline's default, or for
            an SD3 base without T5, such as a genlab model=sd3 run, the count it was trained with: 1).
    """

    denoiser = "transformer"  # LoRA on the base's transformer makes it a trained network (SketchConditioned)

    def __init__(self, options: ControlNetOptions):
        o = options
        self.kind = base_kinds.require_kind(o.base, tuple(CLASSES), "FlowControlNet")
        refuse_unet_only_keys(o, self.kind)
        lora_variants.refuse_on_quantized(o.lora, o.quantize_base, "transformer")
        offload.check(o.offload_base, int(o.lora.get("rank", 0)), o.quantize_base, "transformer")
        if o.offload_base and self.kind == "z-image":  # its ControlNet borrows the base's embedders at each call
            raise ConfigError("model.offload_base is not built for Z-Image bases (their ControlNet shares the base's "
                              "embedders); set model.offload_base=null.")
        self.offload_base = o.offload_base
        self.image_size = o.image_size
        self.base = base_kinds.diffusers_dir(o.base, o.base_config)
        parts = base_parts(self.kind, o.base, self.base)
        self.transformer, self.vae = parts.pop("transformer"), parts["vae"]
        self.frozen = parts  # everything the pipeline needs besides transformer, ControlNet and scheduler
        channels, factor = self.vae_shape()
        if o.channels != channels:
            raise ConfigError(f"data.channels={o.channels}, but the VAE takes {channels}-channel images.")
        if o.image_size % (2 * factor):  # SD3 patches 2x2 latents, Flux packs them
            raise ConfigError(f"data.image_size={o.image_size}: use a multiple of {2 * factor} for this base's VAE.")
        for module in [self.transformer, *parts.values()]:
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()
        # The ControlNet copies the transformer *before* any LoRA is added to it.
        cfg = o.controlnet
        if cfg.get("pretrained"):
            self.controlnet = ld.load_pretrained(_diffusers(CLASSES[self.kind][0]), cfg["pretrained"], "controlnet")
        else:
            self.controlnet = controlnet_for(self.kind, self.transformer, cfg.get("num_layers"),
                                             cfg.get("num_single_layers"))
        self.controlnet.requires_grad_(True).train()
        quantize.quantize_frozen(self.transformer, o.quantize_base)  # after the ControlNet copied full precision
        self.lora_rank = int(o.lora.get("rank", 0))
        if self.lora_rank > 0:
            # lora, dora, loha or lokr on the attention projections by default.
            self.transformer.add_adapter(lora_variants.adapter_config(o.lora))
        if o.gradient_checkpointing:  # the frozen transformer too: gradients flow through it to the ControlNet
            if self.kind == "z-image":  # diffusers' ZImageControlNetModel reads the flag but never declares it
                self.controlnet.gradient_checkpointing = False
            self.transformer.enable_gradient_checkpointing()
            self.controlnet.enable_gradient_checkpointing()
        tokens = (o.image_size // factor // 2) ** 2  # the transformer's sequence length (2x2 latent patches)
        self.diffusion = Diffusion.build(training_scheduler(self.base, tokens), **o.diffusion)
        self.text_tokens = o.max_sequence_length or text_tokens(self.kind, parts)
        self.init_sampling(self.diffusion, o)
        # Built once: it refuses a sampler the pipeline cannot run before training starts, and `encode` reuses it
        # every step (its text encoders and tokenizers are frozen, moved in place by `to`).
        self.prompt_pipe = self.pipeline(self.sampler_name)
        self.weight_dtype = torch.float32

    # --- the Family protocol ------------------------------------------------------------

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: ld.StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = self.image_latents(batch, rng)  # (B, c, h, w), normalised as the pipeline decodes them
        with torch.no_grad():
            captions = ld.drop_captions(batch["caption"], self.caption_dropout, rng)
            text = self.encode(captions)
            control = self.control_latents(batch["sketch"], rng)
        noisy, t, target, weight = self.diffusion.training_inputs(latents, rng)  # target: velocity noise - x0
        pred, target = self.velocity(noisy, t, text, control, target)
        loss = self.diffusion.loss(pred, target, weight)
        return loss, {"loss": loss.detach()}

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "FlowControlNet":
        self.weight_dtype = ld.weight_dtype_for(device, dtype)
        for frozen in [self.transformer, *self.frozen.values()]:
            if isinstance(frozen, nn.Module) and not offload.is_offloaded(frozen):  # offloaded: moves its groups itself
                ld.move(frozen, device, self.weight_dtype)
        offload.offload_frozen(self.transformer, self.offload_base, device)
        quantize.set_dtype(self.transformer, self.weight_dtype)  # what a quantised transformer's int8 layers hand on
        ld.move(self.controlnet, device, torch.float32)
        cast_training_params([self.transformer, self.controlnet], torch.float32)  # LoRA stays fp32
        return self

    @torch.no_grad()
    def sample(self, n: int, seed: int, sketch: Any = None, prompt: str | list[str] | None = None,
               sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
               control_scale: float | None = None, lora: list[str | tuple[str, float]] | None = None,
               own_lora: float = 1.0, **options: Any) -> torch.Tensor:
        """`n` images following `sketch` (path, PIL or tensor in [0, 1]) and `prompt`, (n, 3, H, W) in [-1, 1].

        With no sketch: the first val pairs of the training data (sketches and captions). `lora` stacks
        extra transformer LoRAs of the base's kind ("PATH[:weight]" or (path, weight)); `own_lora`
        weights the transformer's trained LoRA (0: the base as it was, for ablations).
        """
        if options:
            raise GenlabError(f"controlnet ({base_kinds.KINDS[self.kind]} base): unknown sample option(s) "
                              f"{sorted(options)}; it takes sketch, prompt, sampler, steps, guidance, control_scale, "
                              "lora, own_lora.")
        sketches, prompts = self.sample_conditions(n, sketch, prompt)
        pipe = self.pipeline(sampler or self.sampler_name)
        with ld.eval_mode(pipe.transformer, pipe.controlnet), ld.sample_autocast(pipe.device, self.weight_dtype), \
                ld.stacked_loras(pipe, lora or [], own_lora, self.lora_rank > 0, denoiser="transformer"), \
                torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # SD3's pipeline draws the sketch's VAE latents from the global RNG
            # A [-1, 1] tensor is what the pipelines make of a PIL control image.
            out = pipe(prompts, control_image=sketches.to(pipe.device) * 2 - 1, height=self.image_size,
                       width=self.image_size,
                       num_inference_steps=self.diffusion.check_steps(steps or self.sample_steps),
                       **self.call_options(n, self.guidance if guidance is None else guidance),
                       controlnet_conditioning_scale=self.control_scale if control_scale is None else control_scale,
                       max_sequence_length=self.text_tokens, generator=ld.generators(n, seed), output_type="pt").images
        return out.float() * 2 - 1

    def export(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        export(self.controlnet, out_dir)
        if self.lora_rank > 0:
            save_transformer_adapter(self.kind, self.transformer, out_dir)
        ld.write_export_info(out_dir, family="controlnet", base_kind=self.kind, base=ld.pipeline_location(self.base),
                             lora_rank=self.lora_rank, max_sequence_length=self.text_tokens)

    # --- helpers -----------------------------------------------------------------------

    def pipeline(self, sampler: str):
        """The diffusers ControlNet pipeline of the base's kind over this family's (unwrapped) parts."""
        if self.kind in EULER_ONLY and sampler != "euler":
            raise GenlabError(f"--sampler {sampler}: {CLASSES[self.kind][2]} hands its sampler custom sigmas, which "
                              "only euler takes; use --sampler euler.")
        pipe = _diffusers(CLASSES[self.kind][2])(
            **self.frozen, transformer=ld.unwrap(self.transformer), controlnet=ld.unwrap(self.controlnet),
            scheduler=self.diffusion.inference_scheduler(sampler))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def image_latents(self, batch: dict[str, Any], rng: ld.StepRandom) -> torch.Tensor:
        """(z - shift) * scale: the latents the pipelines decode with `/ scale + shift`."""
        return shifted_latents(self.vae, batch, rng)

    def control_latents(self, sketch: torch.Tensor, rng: ld.StepRandom) -> torch.Tensor:
        """The sketch's latents as the pipelines make them: [0, 1] pixels as [-1, 1], a posterior sample.
        SD3's ControlNets from `from_transformer` (force_zeros_for_pooled_projection) skip the shift."""
        vae = self.vae.config
        zero_shift = ld.unwrap(self.controlnet).config.get("force_zeros_for_pooled_projection")
        shift = 0.0 if zero_shift else vae.shift_factor
        control = cached_or_encoded_latents({"image": sketch * 2 - 1}, self.vae, rng)
        return control - shift * vae.scaling_factor

    def velocity(self, noisy: torch.Tensor, t: torch.Tensor, text: dict, control: torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) in the layout the transformer predicts in (Flux: packed tokens)."""
        if self.kind == "sd3":
            return self.sd3_velocity(noisy, t, text, control), target
        return self.flux_velocity(noisy, t, text, control), pack(target)

    def vae_shape(self) -> tuple[int, int]:
        """(image channels, downsampling factor) of the base's VAE."""
        return self.vae.config.in_channels, ld.vae_factor(self.vae)

    def call_options(self, n: int, guidance: float) -> dict[str, Any]:
        """The pipeline call's keywords of the kind: `model.guidance` as it takes it (SD3: CFG scale; Flux: the guidance
        embedding), and what else it needs to sample as genlab trained."""
        return {"guidance_scale": guidance}

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own prompt encoding: {"encoder_hidden_states", "pooled_projections"} (+ Flux's "txt_ids")."""
        return encode_prompt(self.kind, self.prompt_pipe, captions, self.text_tokens)

    def sd3_velocity(self, noisy: torch.Tensor, t: torch.Tensor, text: dict, control: torch.Tensor) -> torch.Tensor:
        """SD3: the transformer's velocity (B, c, h, w), the ControlNet's block outputs added, as in the pipeline."""
        config = ld.unwrap(self.controlnet).config
        pooled = text["pooled_projections"]
        blocks = self.controlnet(
            hidden_states=noisy, timestep=t, controlnet_cond=control,
            encoder_hidden_states=text["encoder_hidden_states"] if config.joint_attention_dim is not None else None,
            pooled_projections=torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled,
            return_dict=False)[0]
        return self.transformer(hidden_states=noisy, timestep=t, **text, block_controlnet_hidden_states=blocks,
                                return_dict=False)[0]

    def flux_velocity(self, noisy: torch.Tensor, t: torch.Tensor, text: dict, control: torch.Tensor) -> torch.Tensor:
        """Flux: the transformer's packed velocity (B, h/2 * w/2, 4c) with the ControlNet's block samples."""
        common = flux_inputs(noisy, t, text)

        def guidance(model):  # the distilled guidance embedding, where the model has one
            return flux_guidance(ld.unwrap(model), len(noisy), self.guidance, noisy.device)

        blocks, single = self.controlnet(**common, controlnet_cond=pack(control),
                                         guidance=guidance(self.controlnet), return_dict=False)
        return self.transformer(**common, guidance=guidance(self.transformer),
                                controlnet_block_samples=blocks, controlnet_single_block_samples=single,
                                controlnet_blocks_repeat=False, return_dict=False)[0]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, c, h, w) latents as Flux's tokens of 2x2 patches, (B, h/2 * w/2, 4c) (the pipeline's `_pack_latents`)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def shifted_latents(vae: nn.Module, batch: dict[str, Any], rng: ld.StepRandom) -> torch.Tensor:
    """(z - shift) * scale of the batch's images (or its latent cache): the latents SD3's, Flux's and Z-Image's
    pipelines decode with `/ scale + shift`."""
    config = vae.config
    return cached_or_encoded_latents(batch, vae, rng) - config.shift_factor * config.scaling_factor


def encode_prompt(kind: str, pipe, captions: list[str], tokens: int) -> dict[str, torch.Tensor]:
    """SD3's or Flux's prompt encoding by its pipeline (`pipe`): {"encoder_hidden_states", "pooled_projections"}
    (+ Flux's "txt_ids"), the T5 part `tokens` long."""
    if kind == "sd3":
        text, _, pooled, _ = pipe.encode_prompt(list(captions), None, None, do_classifier_free_guidance=False,
                                                max_sequence_length=tokens)
        return {"encoder_hidden_states": text, "pooled_projections": pooled}
    text, pooled, text_ids = pipe.encode_prompt(list(captions), None, max_sequence_length=tokens)
    return {"encoder_hidden_states": text, "pooled_projections": pooled, "txt_ids": text_ids}


def flux_inputs(noisy: torch.Tensor, t: torch.Tensor, text: dict) -> dict[str, Any]:
    """What FluxPipeline hands its transformer (and ControlNet) for latents (B, c, h, w) at steps t in [0, 1000]:
    packed latents, image position ids, t / 1000 and the prompt's tensors."""
    from diffusers import FluxPipeline

    b, _, h, w = noisy.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    return dict(hidden_states=pack(noisy), timestep=t / 1000, img_ids=img_ids, **text)


def flux_guidance(model: nn.Module, b: int, value: float, device: torch.device) -> torch.Tensor | None:
    """Flux's distilled guidance embedding input (B,), where `model` has one (`guidance_embeds`), else None."""
    return torch.full((b,), float(value), device=device) if model.config.guidance_embeds else None
