"""Random-weight stand-ins of the flow-matching bases whose text encoder is a language model:
Qwen-Image (Qwen2.5-VL), Z-Image (Qwen3), Sana (Gemma 2) and Flux.2 [klein] (Qwen3), real-sized or tiny,
nothing downloaded.

As `stand_ins.py` for SDXL/SD3/Flux: each kind's published configs (the hub repositories'
transformer/, vae/, text_encoder/ and scheduler/ config.json) as keyword arguments, and the same
classes shrunk for tests. The tokenizers are built offline: a byte-level BPE without merges
(every byte one token) with the special tokens and chat template the pipelines use, so prompts
run through exactly the pipelines' own encoding code, only with more, shorter tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Qwen/Qwen-Image: transformer 20,430M (60 MMDiT blocks); text encoder Qwen2.5-VL-7B-Instruct 8,292M; VAE 127M.
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=[16, 56, 56])
QWEN_IMAGE = {
    "real": {
        "transformer": QWEN_IMAGE_TRANSFORMER,
        # AutoencoderKLQwenImage's defaults are Qwen-Image's (the Wan 2.1 VAE): 8x down, 16 channels.
        "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                    temperal_downsample=[False, True, True]),
        "text": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2),
    },
    "tiny": {
        # The same classes (patch size, RoPE axes layout, 16-channel 8x VAE, mrope text model), a few channels.
        "transformer": {**QWEN_IMAGE_TRANSFORMER, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                        "joint_attention_dim": 32, "axes_dims_rope": [4, 6, 6]},
        "vae": dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                    temperal_downsample=[False, True, True]),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, rope_theta=1000000.0,
                     rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        "vision": dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                       fullatt_block_indexes=[0], window_size=112, tokens_per_second=2),
    },
}
# Qwen/Qwen-Image's scheduler: the shift exp(mu) grows with the image's token count (to 8192 tokens, 0.9 at most).
QWEN_IMAGE_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                            time_shift_type="exponential")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Qwen3's chat template for the one user message the pipelines format: Z-Image's leaves thinking on (nothing
# added), Flux.2 [klein]'s turns it off (Qwen3 then opens the answer with an empty think block).
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                      "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
                      "{% endif %}{% endif %}")


def qwen_tokenizer():
    """A Qwen2 tokenizer (byte-level BPE, Qwen's special tokens and chat template) with every byte one token."""
    from transformers import Qwen2Tokenizer

    from genlab.text import byte_tokens

    vocab = {t: i for i, t in enumerate(byte_tokens())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


def build_qwen_image(size: str = "tiny") -> dict[str, torch.nn.Module]:
    """Qwen-Image's transformer, VAE and Qwen2.5-VL text encoder at `size`, random weights."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shapes = QWEN_IMAGE[size]
    tokenizer = qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    # Tiny: the vocabulary of the offline tokenizer; real: the published size and ids.
    text = {"vocab_size": len(tokenizer), "bos_token_id": None, "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id, **shapes["text"]}
    if size == "real":
        text.update(vocab_size=152064, bos_token_id=151643, eos_token_id=151645, pad_token_id=None)
        ids = {}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=shapes["vision"], **ids)
    return {"transformer": QwenImageTransformer2DModel(**shapes["transformer"]),
            "vae": AutoencoderKLQwenImage(**shapes["vae"]),
            "text_encoder": Qwen2_5_VLForConditionalGeneration(config)}


def save_qwen_image(out_dir: Path, size: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None) -> Path:
    """A `QwenImagePipeline` directory with random weights (Qwen-Image's resolution-dependent shift).

    `tokenizer_dir` is accepted for the same signature as the other savers; the tokenizer is built here.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(seed)
    QwenImagePipeline(**build_qwen_image(size), tokenizer=qwen_tokenizer(),
                      scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)).save_pretrained(out_dir)
    return Path(out_dir)


# Tongyi-MAI/Z-Image-Turbo: transformer 6,155M (30 single-stream blocks over text and image tokens); text
# encoder Qwen3-4B 4,022M; Flux's 16-channel VAE 84M.
Z_IMAGE_TRANSFORMER = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
                           n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                           cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                           axes_lens=[1024, 512, 512])
FLUX_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, sample_size=1024,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
Z_IMAGE = {
    "real": {
        "transformer": Z_IMAGE_TRANSFORMER,
        "vae": FLUX_VAE,
        "text": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                     tie_word_embeddings=True, max_position_embeddings=40960),
    },
    "tiny": {
        # The same classes (2x2 patches, refiners, 3-axis RoPE, Flux VAE's 16 channels and statistics), a few channels.
        "transformer": {**Z_IMAGE_TRANSFORMER, "dim": 32, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2,
                        "n_kv_heads": 2, "cap_feat_dim": 32, "axes_dims": [4, 6, 6]},
        "vae": {**FLUX_VAE, "block_out_channels": [8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4,
                "sample_size": 32, "down_block_types": ["DownEncoderBlock2D"] * 3,
                "up_block_types": ["UpDecoderBlock2D"] * 3},
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True),
    },
}


def build_z_image(size: str = "tiny") -> dict[str, torch.nn.Module]:
    """Z-Image's transformer, VAE and Qwen3 text encoder at `size`, random weights."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Model

    shapes = Z_IMAGE[size]
    return {"transformer": ZImageTransformer2DModel(**shapes["transformer"]), "vae": AutoencoderKL(**shapes["vae"]),
            "text_encoder": Qwen3Model(qwen3_config(shapes["text"], size))}


def qwen3_config(shape: dict, size: str):
    """A `Qwen3Config` of `shape`: tiny over the offline tokenizer's vocabulary, real with Qwen3's token ids."""
    from transformers import Qwen3Config

    tokenizer = qwen_tokenizer()
    text = {"vocab_size": len(tokenizer), "bos_token_id": None, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"), **shape}
    if size == "real":
        text.update(bos_token_id=151643, eos_token_id=151645, pad_token_id=None)
    return Qwen3Config(**text)


def save_z_image(out_dir: Path, size: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None) -> Path:
    """A `ZImagePipeline` directory with random weights (Z-Image-Turbo's scheduler: a fixed shift of 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    torch.manual_seed(seed)
    ZImagePipeline(**build_z_image(size), tokenizer=qwen_tokenizer(),
                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
                   ).save_pretrained(out_dir)
    return Path(out_dir)


# Efficient-Large-Model/Sana_1600M_1024px_diffusers: transformer 1,604M (linear-attention DiT); text encoder
# Gemma-2-2B 2,614M; DC-AE f32c32 (32x down, 32 channels) 312M.
SANA_TRANSFORMER = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                        num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                        caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
                        norm_elementwise_affine=False, norm_eps=1e-6)
DC_AE_BLOCKS = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
DC_AE = dict(in_channels=3, latent_channels=32, attention_head_dim=32, encoder_block_types=DC_AE_BLOCKS,
             decoder_block_types=DC_AE_BLOCKS, encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
             decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024], encoder_layers_per_block=[2, 2, 2, 3, 3, 3],
             decoder_layers_per_block=[3, 3, 3, 3, 3, 3], encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
             decoder_qkv_multiscales=[[], [], [], [5], [5], [5]], upsample_block_type="interpolate",
             downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
             scaling_factor=0.41407)
SANA = {
    "real": {
        "transformer": SANA_TRANSFORMER,
        "vae": DC_AE,
        "text": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256),
    },
    "tiny": {
        # The same classes (linear attention, cross-attention to Gemma 2, DC-AE's ResBlock and EfficientViT
        # stages, 32 latent channels); sample_size 16 is the smallest with a resolution-binning table.
        "transformer": {**SANA_TRANSFORMER, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
                        "num_cross_attention_heads": 2, "cross_attention_head_dim": 16, "cross_attention_dim": 32,
                        "caption_channels": 32, "sample_size": 16},
        "vae": {**DC_AE, "attention_head_dim": 8, "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
                "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
                "encoder_block_out_channels": [8, 16, 32], "decoder_block_out_channels": [8, 16, 32],
                "encoder_layers_per_block": [1, 1, 1], "decoder_layers_per_block": [1, 1, 1],
                "encoder_qkv_multiscales": [[], [], [5]], "decoder_qkv_multiscales": [[], [], [5]]},
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16),
    },
}
# Sana's scheduler: DPM-Solver++ (2nd order) over flow sigmas shifted by 3.
SANA_SCHEDULER = dict(algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction",
                      use_flow_sigmas=True, flow_shift=3.0)


def gemma_tokenizer():
    """A Gemma tokenizer (BPE with byte fallback and Gemma's special tokens) with every byte one token."""
    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    return GemmaTokenizer(vocab=vocab, merges=[])


def build_sana(size: str = "tiny") -> dict[str, torch.nn.Module]:
    """Sana's transformer, DC-AE and Gemma 2 text encoder at `size`, random weights."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    shapes = SANA[size]
    tokenizer = gemma_tokenizer()
    text = {"vocab_size": len(tokenizer), "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, **shapes["text"]}
    return {"transformer": SanaTransformer2DModel(**shapes["transformer"]), "vae": AutoencoderDC(**shapes["vae"]),
            "text_encoder": Gemma2Model(Gemma2Config(**text))}


def save_sana(out_dir: Path, size: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None) -> Path:
    """A `SanaPipeline` directory with random weights (DPM-Solver++ on flow sigmas, shift 3)."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    torch.manual_seed(seed)
    SanaPipeline(**build_sana(size), tokenizer=gemma_tokenizer(),
                 scheduler=DPMSolverMultistepScheduler(**SANA_SCHEDULER)).save_pretrained(out_dir)
    return Path(out_dir)


# black-forest-labs/FLUX.2-klein-4B: transformer 3,876M (5 double-stream and 20 single-stream blocks; the "klein-4b"
# config of diffusers' scripts/convert_flux2_to_diffusers.py); text encoder Qwen3-4B 4,022M (Z-Image's); the
# Flux.2 VAE 84M (AutoencoderKLFlux2's defaults: 8x down, 32 channels, patchified 2x2 to 128 and normalised by
# a BatchNorm's running statistics, which are 0 and 1 here).
FLUX2_KLEIN_TRANSFORMER = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
                               attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                               timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=[32, 32, 32, 32],
                               rope_theta=2000, eps=1e-6, guidance_embeds=False)
# The pipeline feeds the transformer the text encoder's hidden states 9, 18 and 27 side by side (its
# `text_encoder_out_layers` default, an argument of __call__, not a config a stand-in could change), so
# joint_attention_dim is 3 x the encoder's width and the tiny encoder keeps 28 layers: the plain pipeline runs
# with its defaults, and 27 is an inner layer as in Qwen3-4B's 36.
FLUX2_KLEIN_TEXT_LAYERS = (9, 18, 27)
FLUX2_KLEIN = {
    "real": {"transformer": FLUX2_KLEIN_TRANSFORMER, "vae": {}, "text": Z_IMAGE["real"]["text"]},
    "tiny": {
        # The same classes (double and single stream blocks, 4-axis RoPE, 2x2-patchified VAE latents), a few channels.
        "transformer": {**FLUX2_KLEIN_TRANSFORMER, "in_channels": 4 * 4, "num_layers": 1, "num_single_layers": 1,
                        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 3 * 16,
                        "axes_dims_rope": [4, 4, 4, 4]},
        "vae": dict(block_out_channels=[8, 8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                    sample_size=32, down_block_types=["DownEncoderBlock2D"] * 3,
                    up_block_types=["UpDecoderBlock2D"] * 3),
        "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=8, rope_theta=1000000.0, tie_word_embeddings=True),
    },
}
# FlowMatchEulerDiscreteScheduler with dynamic shifting, as diffusers' Flux.2 conversion writes it (FLUX.1-dev's
# scheduler config). The pipeline passes its own mu (compute_empirical_mu of the image token count and the step
# count) and sigma = exp(mu) / (exp(mu) + 1 / t - 1), so shift and the seq-len bounds are unused when sampling.
FLUX2_KLEIN_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                             base_image_seq_len=256, max_image_seq_len=4096)


def build_flux2_klein(size: str = "tiny") -> dict[str, torch.nn.Module]:
    """FLUX.2 [klein] 4B's transformer, VAE and Qwen3 text encoder at `size`, random weights."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    shapes = FLUX2_KLEIN[size]
    return {"transformer": Flux2Transformer2DModel(**shapes["transformer"]), "vae": AutoencoderKLFlux2(**shapes["vae"]),
            "text_encoder": Qwen3ForCausalLM(qwen3_config(shapes["text"], size))}


def save_flux2_klein(out_dir: Path, size: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None) -> Path:
    """A `Flux2KleinPipeline` directory with random weights, step-distilled as FLUX.2-klein-4B (no CFG pass;
    FLUX.2-klein-base-4B is the same architecture with `is_distilled=False`).

    `tokenizer_dir` is accepted for the same signature as the other savers; the tokenizer is built here.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    torch.manual_seed(seed)
    parts = build_flux2_klein(size)
    # The VAE's latent statistics (which the pipeline normalises latents by) not 0 and 1, so that a
    # normalisation skipped or inverted shows in what the stand-in samples.
    bn = parts["vae"].bn
    bn.running_mean.copy_(0.3 * torch.randn_like(bn.running_mean))
    bn.running_var.copy_(torch.empty_like(bn.running_var).uniform_(0.5, 2.0))
    Flux2KleinPipeline(**parts, tokenizer=qwen_tokenizer(), is_distilled=True,
                       scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_KLEIN_SCHEDULER)).save_pretrained(out_dir)
    return Path(out_dir)
