"""Random-weight bases in each kind's architecture, real-sized or tiny: nothing is downloaded.

Each base kind's published configs (the unet/, transformer/, vae/ and text encoders'
config.json of the hub repositories), as keyword arguments of the diffusers / transformers
classes, and the same architecture shrunk for tests (the same block types, added
conditioning and text encoders, a few channels). `build_*` makes the modules (on the meta
device for parameter counts and memory arithmetic), `save_*` a pipeline directory that
`model.base` accepts. Speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

from pathlib import Path

import torch

SDXL = {
    # stabilityai/stable-diffusion-xl-base-1.0: unet 2,567M, text_encoder (CLIP ViT-L) 123M,
    # text_encoder_2 (OpenCLIP ViT-bigG with projection) 695M, vae 84M parameters.
    "real": {
        "unet": dict(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                     cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
                    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
        "text": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
        "text_2": dict(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, projection_dim=1280),
    },
    # The same block types, text_time added conditioning and two text encoders, a few channels.
    "tiny": {
        "unet": dict(sample_size=8, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 1],
                     attention_head_dim=[4, 8], cross_attention_dim=64, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32),
        "vae": dict(block_out_channels=[16, 32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8,
                    sample_size=32, scaling_factor=0.5, down_block_types=["DownEncoderBlock2D"] * 3,
                    up_block_types=["UpDecoderBlock2D"] * 3),
        "text": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
        "text_2": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, projection_dim=32),
    },
}


def text_config(hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                projection_dim: int | None = None, hidden_act: str = "quick_gelu"):
    """A CLIP text config over the full CLIP vocabulary (OpenCLIP bigG uses gelu, CLIP-L quick_gelu)."""
    from genlab.text import tiny_text_config

    config = tiny_text_config(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                              intermediate_size=intermediate_size)
    config.hidden_act = hidden_act
    config.projection_dim = projection_dim or hidden_size
    return config


def build_sdxl(size: str = "tiny") -> dict[str, torch.nn.Module]:
    """SDXL's unet, vae, text_encoder and text_encoder_2 at `size` ("real" or "tiny"), random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    shapes = SDXL[size]
    return {"unet": UNet2DConditionModel(**shapes["unet"]), "vae": AutoencoderKL(**shapes["vae"]),
            "text_encoder": CLIPTextModel(text_config(**shapes["text"])),
            "text_encoder_2": CLIPTextModelWithProjection(text_config(**shapes["text_2"], hidden_act="gelu"))}


def save_sdxl(out_dir: Path, size: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None) -> Path:
    """A `StableDiffusionXLPipeline` directory with random weights (SDXL's Euler scheduler and schedule)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from genlab.text import clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(tokenizer_dir)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(**build_sdxl(size), tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler,
                              add_watermarker=False).save_pretrained(out_dir)
    return Path(out_dir)
