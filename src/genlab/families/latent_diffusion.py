"""Pieces shared by the latent diffusion families (`sd`, `sd3`, `controlnet`, `flow_controlnet`), as `ld.`.

Small functions, no base class: typed config values, a tiny SD U-Net from config, caption dropout,
sampling contexts (autocast, eval mode, per-image generators, prompts), the validation items,
moving frozen parts. Beside them, by concern (and re-exported here, so `ld.<name>` reads as before):
- `families/pretrained_parts.py`: parts from a hub id, a diffusers directory or a genlab run, the
  base's scheduler, genlab_export.json;
- `families/lora_adapters.py`: LoRA configs, diffusers-layout exports, stacking and merging;
- `families/sketch_conditioned.py`: what both ControlNet families share on the sketch side.
The diffusion math (objective, timesteps, weighting, samplers) is the core's: `genlab.diffusion`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from genlab.errors import ConfigError
from genlab.families.contract import unwrap  # noqa: F401  (ld.unwrap, used by sd and controlnet)
from genlab.families.lora_adapters import (  # noqa: F401  (ld.<name>, as before the split)
    ATTENTION, lora_config, merged_copy, parse_loras, resolve_lora, save_unet_lora, stacked_loras)
from genlab.families.pretrained_parts import (  # noqa: F401  (ld.<name>, as before the split)
    base_scheduler, load_pretrained, pipeline_location, resolve_pretrained, write_export_info)
from genlab.step_random import StepRandom


def plain(value: Any) -> Any:
    """A Hydra DictConfig/ListConfig as plain Python (dicts, lists), anything else as it is."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def vae_factor(vae: AutoencoderKL) -> int:
    """How much the VAE downsamples: 2 per level after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tiny_unet(unet_cfg: dict, image_size: int, vae: AutoencoderKL, cross_attention_dim: int) -> UNet2DConditionModel:
    """A UNet2DConditionModel from config, sized to the VAE's latents and the text encoder."""
    factor = vae_factor(vae)
    if image_size % factor:
        raise ConfigError(f"data.image_size={image_size} is not a multiple of the VAE's downsampling factor {factor}.")
    return UNet2DConditionModel(
        sample_size=image_size // factor,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        cross_attention_dim=cross_attention_dim,
        **unet_cfg,
    )


def drop_captions(captions: list[str], p: float, rng: StepRandom) -> list[str]:
    """Replace each caption by "" with probability p: the unconditional branch of CFG."""
    if p <= 0:
        return list(captions)
    keep = rng.rand(len(captions)).cpu() >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def sample_autocast(device: torch.device, weight_dtype: torch.dtype):
    """Autocast for sampling when frozen parts are half precision and trainable ones fp32."""
    if weight_dtype == torch.float32 or (device.type == "cpu" and weight_dtype != torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=weight_dtype)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Eval mode (no LoRA/attention dropout) for sampling, then back to each module's mode."""
    modes = [m.training for m in modules]
    try:
        yield [m.eval() for m in modules]
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def generators(n: int, seed: int) -> list[torch.Generator]:
    """One CPU generator per image: image i depends only on seed + i, not on batching or device."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def as_list(prompt: str | list[str] | None, n: int, default: list[str]) -> list[str]:
    """`n` prompts: one repeated, a list cycled, or the defaults when None."""
    prompts = default if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = prompts or [""]
    return [prompts[i % len(prompts)] for i in range(n)]


def validation_items(data_cfg: Any, n: int) -> list[dict]:
    """The first `n` items of the val split of the training data: fixed prompts and sketches."""
    from genlab.data import build_dataset

    if not data_cfg:
        return []
    dataset = build_dataset(OmegaConf.create(plain(data_cfg)), "val")
    return [dataset[i] for i in range(min(n, len(dataset)))]


def move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`module.to(device, dtype)`, without diffusers' note about fp32-kept modules (SD's have none)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return module.to(device, dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def weight_dtype_for(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """The frozen parts' dtype: as asked, except fp16 on CPU, which Accelerate runs without autocast."""
    if dtype is None or (torch.device(device).type == "cpu" and dtype == torch.float16):
        return torch.float32
    return dtype


