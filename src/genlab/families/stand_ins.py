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

from genlab.families.stand_ins_llm import (build_flux2_klein, build_qwen_image, build_sana, build_z_image,
                                           save_flux2_klein, save_qwen_image, save_sana, save_z_image)

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


def t5_tokenizer():
    """A T5 tokenizer (a small unigram vocabulary: letters and word-initial letters) built offline."""
    import string

    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -1.0) for c in string.ascii_lowercase] + [(c, -2.0) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu")  # google/t5-v1_1-xxl's encoder: 4,762M parameters
VAE_16 = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, sample_size=1024,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              use_quant_conv=False, use_post_quant_conv=False)  # SD3's and Flux's 16-channel VAE: 84M
TINY_VAE_16 = dict(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                   down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                   use_quant_conv=False, use_post_quant_conv=False)
TINY_T5 = dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=55)
# The latent statistics each base's VAE normalises by: the same for its real and tiny stand-in.
SD3_LATENTS = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_LATENTS = dict(scaling_factor=0.3611, shift_factor=0.1159)
SD3 = {
    # stabilityai/stable-diffusion-3.5-large: transformer 8,057M; CLIP-L and OpenCLIP bigG with projections, T5-XXL.
    "real": {
        "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                            attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                            caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                            qk_norm="rms_norm"),
        "vae": {**VAE_16, **SD3_LATENTS},
        "text": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, projection_dim=768),
        "text_2": dict(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, projection_dim=1280),
        "t5": T5_XXL,
    },
    "tiny": {
        "transformer": dict(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                            caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16),
        "vae": {**TINY_VAE_16, **SD3_LATENTS},
        "text": dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32),
        "text_2": dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32),
        "t5": TINY_T5,
    },
}
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=[16, 56, 56])  # FLUX.1-dev's
FLUX = {
    # black-forest-labs/FLUX.1-dev: transformer 11,902M (guidance-distilled); CLIP-L, T5-XXL.
    "real": {
        "transformer": FLUX_TRANSFORMER,
        "vae": {**VAE_16, **FLUX_LATENTS},
        "text": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
        "t5": T5_XXL,
    },
    "tiny": {
        # The real transformer with every size shrunk (patch size and guidance embedding kept).
        "transformer": {**FLUX_TRANSFORMER, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
                        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                        "pooled_projection_dim": 16, "axes_dims_rope": [4, 4, 8]},
        "vae": {**TINY_VAE_16, **FLUX_LATENTS},
        "text": dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32),
        "t5": TINY_T5,
    },
}


def build_sd3(size: str = "tiny") -> dict[str, torch.nn.Module]:
    """SD3.5's transformer, vae and three text encoders at `size`, random weights."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    shapes = SD3[size]
    return {"transformer": SD3Transformer2DModel(**shapes["transformer"]), "vae": AutoencoderKL(**shapes["vae"]),
            "text_encoder": CLIPTextModelWithProjection(text_config(**shapes["text"])),
            "text_encoder_2": CLIPTextModelWithProjection(text_config(**shapes["text_2"], hidden_act="gelu")),
            "text_encoder_3": T5EncoderModel(T5Config(**shapes["t5"]))}


def build_flux(size: str = "tiny") -> dict[str, torch.nn.Module]:
    """FLUX.1-dev's transformer, vae, CLIP and T5 text encoders at `size`, random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    shapes = FLUX[size]
    return {"transformer": FluxTransformer2DModel(**shapes["transformer"]), "vae": AutoencoderKL(**shapes["vae"]),
            "text_encoder": CLIPTextModel(text_config(**shapes["text"])),
            "text_encoder_2": T5EncoderModel(T5Config(**shapes["t5"]))}


def save_sd3(out_dir: Path, size: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None) -> Path:
    """A `StableDiffusion3Pipeline` directory with random weights (flow-matching Euler scheduler, shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from genlab.text import clip_tokenizer

    torch.manual_seed(seed)
    clip = clip_tokenizer(tokenizer_dir)
    StableDiffusion3Pipeline(**build_sd3(size), tokenizer=clip, tokenizer_2=clip, tokenizer_3=t5_tokenizer(),
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)).save_pretrained(out_dir)
    return Path(out_dir)


def save_flux(out_dir: Path, size: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None) -> Path:
    """A `FluxPipeline` directory with random weights (FLUX.1-dev's resolution-dependent shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from genlab.text import clip_tokenizer

    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(**build_flux(size), tokenizer=clip_tokenizer(tokenizer_dir), tokenizer_2=t5_tokenizer(),
                 scheduler=scheduler).save_pretrained(out_dir)
    return Path(out_dir)


#: `genlab stand-in KIND OUT`: the kinds it writes (those with a language model for text encoder: stand_ins_llm.py).
SAVERS = {"sdxl": save_sdxl, "sd3": save_sd3, "flux": save_flux, "qwen-image": save_qwen_image,
          "z-image": save_z_image, "sana": save_sana, "flux2-klein": save_flux2_klein}
#: Their modules at `size` ("real" or "tiny"), random weights, for what needs the networks and no folder
#: (train/memory_plan.py builds them on the meta device).
BUILDERS = {"sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux, "qwen-image": build_qwen_image,
            "z-image": build_z_image, "sana": build_sana, "flux2-klein": build_flux2_klein}
