"""LoRA on the diffusers networks of latent diffusion families: peft configs, diffusers-layout exports,
extra adapters stacked for sampling (`--lora`) and merged copies. The variants (DoRA, LoHa, LoKr, QLoRA)
are `families/lora_variants.py`'s.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from torch import nn

from genlab.errors import GenlabError
from genlab.families.contract import unwrap
from genlab.run_dir import RunDir


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # the usual LoRA targets: attention projections


def lora_config(lora: dict, default_targets: list[str] = ATTENTION):
    """A peft LoraConfig from {rank, alpha (None: = rank, a scale of 1), target_modules, dropout}."""
    from peft import LoraConfig

    rank = int(lora["rank"])
    return LoraConfig(r=rank, lora_alpha=lora.get("alpha") or rank,
                      target_modules=list(lora.get("target_modules") or default_targets),
                      lora_dropout=lora.get("dropout", 0.0), init_lora_weights="gaussian")


def save_unet_lora(unet: nn.Module, out_dir: Path) -> Path:
    """Write the U-Net's LoRA as `out_dir/pytorch_lora_weights.safetensors` (diffusers' layout)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = unwrap(unet)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    # The metadata carries lora_alpha, so loaders scale by alpha / rank as in training.
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return Path(out_dir) / "pytorch_lora_weights.safetensors"


def parse_loras(loras: list[str | tuple[str, float]] | None) -> list[tuple[str, float]]:
    """`--lora` values: "PATH[:weight]" strings (weight 1.0 when absent) or (path, weight) pairs."""
    parsed = []
    for entry in loras or []:
        if isinstance(entry, str):
            path, _, weight = entry.rpartition(":")
            try:
                entry = (path, float(weight)) if path else (entry, 1.0)
            except ValueError:  # a colon that is part of the path
                entry = (entry, 1.0)
        parsed.append((str(entry[0]), float(entry[1])))
    return parsed


def resolve_lora(path: str | Path) -> dict[str, str]:
    """`load_lora_weights` arguments for a LoRA file, a folder holding one, a genlab run or a hub id."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        if p.suffix == ".safetensors" or not _is_hub_id(str(path)):
            raise GenlabError(f"--lora {path}: no such file or folder.")
        return {"pretrained_model_name_or_path_or_dict": str(path)}
    if p.is_file():
        return {"pretrained_model_name_or_path_or_dict": str(p.parent), "weight_name": p.name}
    if (run := RunDir(p)).is_run():
        p = run.export
    if not (p / "pytorch_lora_weights.safetensors").exists():
        raise GenlabError(f"--lora {path}: no pytorch_lora_weights.safetensors there "
                          "(was the run trained with model.lora.rank > 0?).")
    return {"pretrained_model_name_or_path_or_dict": str(p)}


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@contextlib.contextmanager
def quiet_lora_loading():
    """Silence the expected notes of a U-Net-only LoRA load (no text-encoder keys, a second adapter)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextlib.contextmanager
def stacked_loras(pipe, loras: list[tuple[str, float]], own_weight: float, has_own: bool, denoiser: str = "unet"):
    """Within the block, extra U-Net LoRAs [(path, weight)] mixed with the trained one ("default").

    Args:
        pipe: a diffusers pipeline whose denoiser may carry the run's own adapter.
        loras: extra adapters to load and their weights.
        own_weight: weight of the run's own adapter (0 swaps it out).
        has_own: whether the denoiser has the run's own adapter.
        denoiser: the pipeline's attribute holding the adapted network ("unet", or an SD3 pipeline's "transformer").
    """
    if not loras and (own_weight == 1.0 or not has_own):
        yield
        return
    names, weights = (["default"], [own_weight]) if has_own else ([], [])
    loaded = []
    try:
        for i, (path, weight) in enumerate(parse_loras(loras)):
            try:
                with quiet_lora_loading():
                    pipe.load_lora_weights(**resolve_lora(path), adapter_name=f"extra_{i}")
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                # Two lines: a state_dict error's heading says little without its first mismatch.
                reason = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])
                raise GenlabError(f"--lora {path}: cannot load it onto this base ({reason})") from e
            if f"extra_{i}" not in pipe.get_list_adapters().get(denoiser, []):  # diffusers loads no keys with a warning
                raise GenlabError(f"--lora {path}: none of its layers is in this base's {denoiser}; is it a LoRA for "
                                  "another kind of base?")
            loaded.append(f"extra_{i}")
            names.append(f"extra_{i}")
            weights.append(float(weight))
        pipe.set_adapters(names, weights)
        yield
    finally:
        if loaded:
            getattr(pipe, denoiser).delete_adapters(loaded)
            unnest_emptied_layers(getattr(pipe, denoiser))
        if has_own:
            getattr(pipe, denoiser).set_adapters(["default"], [1.0])


def unnest_emptied_layers(model: nn.Module) -> None:
    """Put back layers that peft wrapped to stack an adapter of another type, once that adapter is deleted.

    A LoRA loaded onto a layer that already holds a LoHa/LoKr wraps it (LoraLayer(base_layer=LoHaLayer));
    `delete_adapters` empties the wrapper but keeps it, and the next `load_lora_weights` then looks for the
    base weight one `base_layer.` too shallow (a KeyError on Flux). Layers of a single type are left alone.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        inner = getattr(module, "base_layer", None)
        if not (isinstance(module, BaseTunerLayer) and isinstance(inner, BaseTunerLayer)):
            continue
        if not any(len(getattr(module, n)) for n in module.adapter_layer_names):  # the wrapper holds nothing
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, inner)


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of a peft-adapted diffusers model with its LoRA merged in and the adapters removed."""
    import copy

    model = copy.deepcopy(unwrap(model)).float()
    model.fuse_lora()
    model.unload_lora()
    return model
