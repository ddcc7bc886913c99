"""What an SDXL base adds to a Stable Diffusion one, for the ControlNet family.

SDXL's U-Net reads two text encoders: the penultimate hidden states of CLIP ViT-L and of
OpenCLIP bigG, concatenated (B, 77, 768 + 1280), and through its `text_time` added
conditioning the pooled, projected output of the second (B, 1280) with six "time ids"
(original height and width, crop top and left, target height and width). The ControlNet
copy (`ControlNetModel.from_unet`) takes the same added conditioning. Here the images are
the data's square `image_size`, uncropped, as `StableDiffusionXLControlNetPipeline` assumes
by default, so training and sampling condition alike.
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, ControlNetModel, ControlNetUnionModel, StableDiffusionXLControlNetPipeline,
                       StableDiffusionXLControlNetUnionPipeline, UNet2DConditionModel)
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from genlab.errors import ConfigError
from genlab.families import latent_diffusion as ld


def load_parts(base: str, vae: str | None) -> tuple[AutoencoderKL, list[nn.Module], list[CLIPTokenizer],
                                                     UNet2DConditionModel]:
    """VAE (`vae` overrides the base's own), both text encoders, both tokenizers and the U-Net of an SDXL base."""
    vae_model = ld.load_pretrained(AutoencoderKL, vae or base, "vae")
    encoders = [ld.load_pretrained(CLIPTextModel, base, "text_encoder"),
                ld.load_pretrained(CLIPTextModelWithProjection, base, "text_encoder_2")]
    tokenizers = [ld.load_pretrained(CLIPTokenizer, base, "tokenizer"),
                  ld.load_pretrained(CLIPTokenizer, base, "tokenizer_2")]
    unet = ld.load_pretrained(UNet2DConditionModel, base, "unet")
    if unet.config.in_channels != vae_model.config.latent_channels:
        raise ConfigError(f"model.vae: its latents have {vae_model.config.latent_channels} channels but the "
                          f"base U-Net takes {unet.config.in_channels}; use the base's own VAE (model.vae=null).")
    for frozen in (vae_model, *encoders):
        frozen.requires_grad_(False).eval()
    return vae_model, encoders, tokenizers, unet


def encode_prompt(tokenizers: list[CLIPTokenizer], encoders: list[nn.Module], captions: list[str],
                  image_size: int) -> dict:
    """The U-Net's (and ControlNet's) text inputs, as `StableDiffusionXLPipeline.encode_prompt` makes them.

    Returns:
        {"encoder_hidden_states": (B, 77, D1 + D2), "added_cond_kwargs": {"text_embeds": (B, P),
        "time_ids": (B, 6)}}.
    """
    hidden = []
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(ld.unwrap(encoder).device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # the penultimate layer, as SDXL was trained
    pooled = out[0]  # the second encoder's projected pooled output
    size = (image_size, image_size)
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=hidden[0].dtype, device=pooled.device)
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1),
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(captions), 1)}}


def controlnet_pipeline(base: str, vae: AutoencoderKL, encoders: list[nn.Module], tokenizers: list[CLIPTokenizer],
                        unet: nn.Module, controlnet: ControlNetModel | ControlNetUnionModel, scheduler,
                        union: bool = False) -> StableDiffusionXLControlNetPipeline:
    """The diffusers SDXL ControlNet pipeline over these parts (`union`: the union ControlNet's,
    `StableDiffusionXLControlNetUnionPipeline`), with the base's empty-prompt rule
    (`force_zeros_for_empty_prompt`), so it samples what the base's own pipeline would."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(ld.pipeline_location(base))
    pipeline = StableDiffusionXLControlNetUnionPipeline if union else StableDiffusionXLControlNetPipeline
    return pipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, controlnet=controlnet, scheduler=scheduler,
        force_zeros_for_empty_prompt=config.get("force_zeros_for_empty_prompt", True), add_watermarker=False)
