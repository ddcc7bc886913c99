"""Write a diffusers Stable Diffusion directory as one original-layout (LDM) .safetensors file.

The inverse of diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` /
`convert_ldm_clip_checkpoint` (loaders/single_file_utils.py), for any number of levels and
layers per block, so a single-file base can be made from genlab's own tiny SD export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _resnet(rest: str) -> str:
    for new, old in RESNET:
        rest = rest.replace(new, old)
    return rest


def unet_key(key: str, config: dict) -> str:
    n = config["layers_per_block"] + 1
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    for new, old in UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{i * n + j + 1}." + ("0." + _resnet(rest) if part == "resnets" else "1." + rest)
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        part, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if part == "resnets" else f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, part, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * n + j}." + ("0." + _resnet(rest) if part == "resnets" else "1." + rest)
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{i * n + n - 1}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"
    raise KeyError(key)


def vae_key(key: str, config: dict) -> str:
    levels = len(config["down_block_types"])
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = m[2]
        for new, old in VAE_ATTN:
            rest = rest.replace(new, old)
        return f"{m[1]}.mid.attn_1.{rest}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    return key


def sd_to_single_file(pipeline_dir: Path, out: Path) -> Path:
    """An SD 1.x pipeline directory (unet/, vae/, text_encoder/) as one LDM-layout .safetensors file."""
    pipeline_dir = Path(pipeline_dir)
    tensors = {}
    unet_cfg = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    for k, v in load_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").items():
        tensors["model.diffusion_model." + unet_key(k, unet_cfg)] = v
    vae_cfg = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    for k, v in load_file(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors").items():
        if ".mid.attn_1." in (ldm := vae_key(k, vae_cfg)) and v.dim() == 2:
            v = v[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        tensors["first_stage_model." + ldm] = v
    for k, v in load_file(pipeline_dir / "text_encoder" / "model.safetensors").items():
        tensors["cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    return out
