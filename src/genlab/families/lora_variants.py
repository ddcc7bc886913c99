"""LoRA variants on the base's denoiser (U-Net, or SD3.x/Flux transformer) through peft, and their
export in the key format of A1111/ComfyUI.

`model.lora.variant`:
- `lora`: W + (alpha / r) B A (peft `LoraConfig`);
- `dora`: LoRA's direction with a learned per-row magnitude (`LoraConfig(use_dora=True)`);
- `loha`: a Hadamard product of two low-rank products, (alpha / r) (W1a W1b) * (W2a W2b) (`LoHaConfig`);
- `lokr`: a Kronecker product, (alpha / r) W1 (x) W2a W2b (`LoKrConfig`).

Exports (beside the ControlNet): `pytorch_lora_weights.safetensors`, diffusers' format, which
`load_lora_weights` takes (lora and dora; diffusers' U-Net loader has no LoHa or LoKr), and
`lora_kohya.safetensors`, the kohya/LyCORIS keys (`lora_unet_<module>.lora_down.weight`,
`.hada_w1_a`, `.lokr_w1`, `.alpha`, DoRA's `.dora_scale`) that A1111, ComfyUI, InvokeAI and
diffusers' own kohya loader read (DoRA: ComfyUI's output-axis formula; A1111 decomposes along
the input axis only, so a peft DoRA, decomposed per output row, does not carry over there).
An SD3.x/Flux transformer's file has the same suffixes under `lora_transformer_<module>`, the
diffusers-layout names ComfyUI maps for both (OneTrainer's layout; diffusers' Flux loader reads
its LoRA too).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from genlab.errors import ConfigError

VARIANTS = ("lora", "dora", "loha", "lokr")
DIFFUSERS_LOADABLE = ("lora", "dora")  # the variants the pipelines' load_lora_weights reads
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def adapter_config(lora: dict, default_targets: list[str] = ATTENTION):
    """A peft config from {rank, alpha (None: = rank, a scale of 1), variant, target_modules, dropout}."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    variant = lora.get("variant") or "lora"
    if variant not in VARIANTS:
        raise ConfigError(f"model.lora.variant={variant!r}: use one of {', '.join(VARIANTS)}.")
    rank = int(lora["rank"])
    common = dict(r=rank, alpha=lora.get("alpha") or rank, target_modules=list(lora.get("target_modules") or default_targets))
    if variant == "loha":
        return LoHaConfig(**common, module_dropout=lora.get("dropout", 0.0))
    if variant == "lokr":
        return LoKrConfig(**common, module_dropout=lora.get("dropout", 0.0))
    common["lora_alpha"] = common.pop("alpha")
    return LoraConfig(**common, lora_dropout=lora.get("dropout", 0.0), init_lora_weights="gaussian",
                      use_dora=variant == "dora")


def refuse_on_quantized(lora: dict, quantize_base: str | None, denoiser: str = "U-Net") -> None:
    """Only LoRA trains on a quantised base: peft's torchao layers (`TorchaoLoraLinear`) are LoRA's alone."""
    variant = lora.get("variant") or "lora"
    if quantize_base and int(lora.get("rank", 0)) > 0 and variant != "lora":
        raise ConfigError(f"model.quantize_base={quantize_base} trains LoRA on the quantised {denoiser} (peft's "
                          f"torchao layers): set model.lora.variant=lora, not {variant}.")


def variant_of(unet: nn.Module) -> str:
    """Which variant the U-Net's (or transformer's) "default" adapter is."""
    config = unet.peft_config["default"]
    kind = type(config).__name__
    return {"LoHaConfig": "loha", "LoKrConfig": "lokr"}.get(kind, "dora" if getattr(config, "use_dora", False) else "lora")


def kohya_state_dict(unet: nn.Module, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """The U-Net's adapter in kohya/LyCORIS keys, scaled so that ComfyUI's formulas give the trained weights.

    `prefix` starts every module's name (`lora_transformer_` for an SD3.x/Flux transformer).

    lora: `lora_down`/`lora_up` + `alpha` (diffusers' `convert_state_dict_to_kohya`, with the real
    alpha: diffusers writes alpha = rank). dora: the same + `dora_scale` (out, 1); ComfyUI divides
    by the norm of the *base* weight's rows there, peft by that of W + dW, so the magnitude is
    stored times |W| / |W + dW|. loha: `hada_w1_a/b`, `hada_w2_a/b` + alpha. lokr: `lokr_w1`,
    `lokr_w2` or their `_a/_b` factors; LyCORIS applies alpha / r only to a rank-decomposed
    factor, peft always, so without one the scale is baked into `lokr_w1`.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    config = unet.peft_config["default"]
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    variant = variant_of(unet)
    if variant in ("lora", "dora"):
        kohya = convert_state_dict_to_kohya({"unet." + k: v for k, v in state.items() if "magnitude" not in k})
        out = {prefix + k.removeprefix("lora_unet_"): v for k, v in kohya.items()}
        for key in [k for k in out if k.endswith(".alpha")]:
            out[key] = torch.tensor(float(config.lora_alpha))
        for key in [k for k in state if "lora_magnitude_vector" in k]:
            module = key.split(".lora_magnitude_vector")[0]
            out[f"{prefix}{module.replace('.', '_')}.dora_scale"] = _comfy_dora_scale(unet.get_submodule(module))
        return out
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")  # e.g. down_blocks.1.attentions.0...to_q, hada_w1_a
        name = f"{prefix}{module.replace('.', '_')}"
        out[f"{name}.{param}"] = value
        if param in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            out[f"{name}.alpha"] = torch.tensor(float(config.alpha))
    for key in [k for k in out if k.endswith(".lokr_w1")]:
        if f"{key.removesuffix('.lokr_w1')}.alpha" not in out:
            out[key] = out[key] * (config.alpha / config.r)
    return out


@torch.no_grad()
def _comfy_dora_scale(layer: nn.Module) -> torch.Tensor:
    """(out, 1): peft's magnitude m, rescaled for ComfyUI's W' = (W + dW) dora_scale / |W| (rows)."""
    weight = layer.base_layer.weight.float()
    delta = layer.get_delta_weight("default").float()
    magnitude = layer.lora_magnitude_vector["default"].weight.float()
    return (magnitude * weight.norm(dim=1) / (weight + delta).norm(dim=1))[:, None].cpu().contiguous()


def save_kohya(unet: nn.Module, out_dir: Path, prefix: str = "lora_unet_") -> Path:
    """`out_dir/lora_kohya.safetensors`: the adapter for A1111 / ComfyUI (metadata: variant, rank, alpha)."""
    config = unet.peft_config["default"]
    alpha = getattr(config, "lora_alpha", None) or getattr(config, "alpha", None)
    path = Path(out_dir) / "lora_kohya.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_state_dict(unet, prefix), path, metadata={"genlab_variant": variant_of(unet),
                                                              "ss_network_dim": str(config.r),
                                                              "ss_network_alpha": str(alpha)})
    return path


def save(unet: nn.Module, out_dir: Path) -> None:
    """The U-Net's adapter in diffusers' format where diffusers loads the variant (lora, dora), and in kohya's."""
    from genlab.families.contract import unwrap
    from genlab.families.lora_adapters import save_unet_lora

    unet = unwrap(unet)
    if variant_of(unet) in DIFFUSERS_LOADABLE:
        save_unet_lora(unet, out_dir)
    save_kohya(unet, out_dir)
