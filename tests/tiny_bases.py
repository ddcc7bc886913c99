"""genlab's own tiny SD export (random weights), the base that several tests build on."""

from __future__ import annotations

from pathlib import Path

import torch

UNET = dict(block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, norm_num_groups=8,
            attention_head_dim=8)


def tiny_sd_export(root: Path) -> Path:
    """`StableDiffusion(...).export(root / "sd")` of an untrained tiny SD on a 4x-down VAE (32 px images)."""
    from diffusers import AutoencoderKL

    from genlab.families.sd import StableDiffusion

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1, sample_size=32, scaling_factor=0.5).save_pretrained(root / "vae")
    family = StableDiffusion(32, vae=str(root / "vae"), unet=UNET, text_encoder=dict(hidden_size=32, num_layers=2),
                             tokenizer_dir=str(root / "tok"))
    family.export(root / "sd")
    return root / "sd"
