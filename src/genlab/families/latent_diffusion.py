"""Pieces shared by the latent diffusion families (`sd`, `controlnet`).

Small functions, no base class: loading pretrained parts from a hub id, a diffusers
directory or a genlab run (and the base's scheduler); building a tiny SD from config;
encoding images and captions; LoRA configs and exports. The diffusion math (objective,
timesteps, weighting, samplers) is the core's: `genlab.diffusion`.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torch import nn

from genlab.errors import ConfigError, GenlabError
from genlab.families.contract import diffusers_blocks, unwrap  # noqa: F401  (ld.unwrap, used by sd and controlnet)
from genlab.run_dir import RunDir
from genlab.step_random import StepRandom

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # the usual LoRA targets: attention projections


def plain(value: Any) -> Any:
    """A Hydra DictConfig/ListConfig as plain Python (dicts, lists), anything else as it is."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def resolve_pretrained(path_or_id: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """Where `from_pretrained` should look for a component.

    Args:
        path_or_id: a genlab run directory (its `export/` is used), a diffusers directory
            (a pipeline or a single model), or a hub id.
        subfolder: the component's folder inside a pipeline ("unet", "vae", ...).

    Returns:
        (path or hub id, subfolder or None): a local single-model directory comes back
        with no subfolder, so a VAE run's `export/` works where a pipeline's `vae/` would.
    """
    path = Path(str(path_or_id)).expanduser()
    if not path.exists():
        if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
            raise GenlabError(f"{path_or_id}: no such directory. Give a genlab run, a diffusers directory or a hub id.")
        return str(path_or_id), subfolder  # a hub id
    if (run := RunDir(path)).is_run():
        if not run.export.is_dir():
            raise GenlabError(f"{path}: this run has no export/ yet; let its training finish (or `genlab resume` it).")
        path = run.export
    if subfolder and (path / subfolder).is_dir():
        return str(path / subfolder), None
    if (path / "config.json").exists() or (path / "tokenizer_config.json").exists():
        return str(path), None
    raise GenlabError(f"{path}: no {subfolder or 'model'} here (expected {subfolder}/ or a config.json).")


def load_pretrained(cls, path_or_id: str, subfolder: str | None = None, **kwargs):
    """`cls.from_pretrained` on whatever `resolve_pretrained` finds, with errors that say which.

    A hub id is tried as a pipeline (with `subfolder`) and then as a single model (a VAE or
    ControlNet repository has its config at the top).
    """
    where, sub = resolve_pretrained(path_or_id, subfolder)
    attempts = [{"subfolder": sub}, {}] if sub else [{}]
    for i, extra in enumerate(attempts):
        try:
            return cls.from_pretrained(where, **extra, **kwargs)
        except (OSError, ValueError) as e:
            if i == len(attempts) - 1:
                what = f"{subfolder} of " if subfolder else ""
                raise GenlabError(f"cannot load {cls.__name__} from {what}{path_or_id}: {e}".split("\n")[0]) from e


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


def base_scheduler(base: str | None):
    """The training scheduler of a pretrained base (DDPMScheduler, or FlowMatchEulerDiscreteScheduler
    for SD3/Flux bases), or None when training from scratch (the diffusion core builds one)."""
    if not base:
        return None
    where, sub = resolve_pretrained(base, "scheduler")
    config = DDPMScheduler.load_config(where, **({"subfolder": sub} if sub else {}))
    if config.get("_class_name", "").startswith("FlowMatch"):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return DDPMScheduler.from_config(config)


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


def load_sketch(sketch: Any, size: int, n: int) -> torch.Tensor:
    """A sketch (path, PIL image, or tensor (C, H, W) / (B, C, H, W) in [0, 1]) as (n, 3, size, size)."""
    from genlab.data.sketches import resize_crop

    if isinstance(sketch, (str, Path)):
        try:
            sketch = Image.open(sketch)
        except OSError as e:
            raise GenlabError(f"--sketch {sketch}: cannot read the image ({e}).") from e
    if isinstance(sketch, Image.Image):
        pixels = np.asarray(resize_crop(sketch.convert("RGB"), size, Image.BILINEAR), dtype=np.float32) / 255.0
        sketch = torch.from_numpy(pixels).permute(2, 0, 1)
    sketch = sketch.float()
    if sketch.dim() == 3:
        sketch = sketch[None]
    if sketch.shape[1] == 1:
        sketch = sketch.expand(-1, 3, -1, -1)
    if sketch.shape[-2:] != (size, size):
        sketch = F.interpolate(sketch, size=(size, size), mode="bilinear", align_corners=False)
    return sketch[torch.arange(n) % sketch.shape[0]]


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


def pipeline_location(path_or_id: str | None) -> str | None:
    """What plain diffusers' `from_pretrained` takes: a run's export/ or a local dir (absolute), or the hub id."""
    if path_or_id is None:
        return None
    path = Path(str(path_or_id)).expanduser()
    if not path.exists():
        return str(path_or_id)
    if (run := RunDir(path)).is_run():
        path = run.export
    return str(path.resolve())


def write_export_info(out_dir: Path, **info: Any) -> None:
    """`genlab_export.json`: where the base parts came from, for readers of the export."""
    (Path(out_dir) / "genlab_export.json").write_text(json.dumps(info, indent=2) + "\n")


class SketchConditioned:
    """What both ControlNet families (`controlnet.UNetControlNet`, `flow_controlnet.FlowControlNet`) share
    on the sketch side: sampling defaults, the fixed validation pairs and the sketch | image grids.

    A family calls `init_sampling` in its constructor, sets the attributes declared below as set by
    the family, and has `sample` and its frozen denoiser under the attribute named by `denoiser`.
    """

    #: sample() options that genlab eval fills from validation items (sketch-following metrics).
    conditions = ("sketch", "prompt")
    #: the attribute holding the base's denoiser ("unet" or "transformer"): trained when it has LoRA.
    denoiser = "unet"

    # Set by the family's __init__:
    image_size: int  #: the data's image size (sketches are resized to it)
    controlnet: nn.Module  #: the trainable ControlNet
    lora_rank: int  #: the LoRA rank on the base's denoiser (0: none, the denoiser stays frozen)
    # Set by init_sampling:
    ema_network: None  #: no EMA for ControlNets (as in the paper)
    num_classes: None
    caption_dropout: float
    sampler_name: str
    sample_steps: int
    guidance: float
    control_scale: float
    validation_data: Any  #: the data config whose first val items are the fixed sample pairs
    _val_items: list[dict] | None  #: those items, read once by validation_pairs

    def networks(self) -> dict[str, nn.Module]:
        nets = {"controlnet": self.controlnet}
        if self.lora_rank > 0:
            nets[self.denoiser] = getattr(self, self.denoiser)
        return nets

    def shard_units(self) -> dict[str, list[nn.Module]]:
        """strategy=fsdp: the ControlNet's blocks and the frozen base denoiser's (U-Net down/mid/up,
        SD3/Flux transformer blocks); the VAE and text encoders are sharded as one unit each."""
        units = {"controlnet": diffusers_blocks(self.controlnet),
                 self.denoiser: diffusers_blocks(getattr(self, self.denoiser))}
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if isinstance(getattr(self, name, None), nn.Module):
                units[name] = []
        return units

    def init_sampling(self, diffusion: Any, options: Any) -> None:
        """Sampling defaults (sampler None: the objective's default), the data of the validation pairs,
        and what every ControlNet shares: no EMA (as in the paper), no classes, caption dropout.
        `options`: the family's `controlnet_options.ControlNetOptions`."""
        o = options
        self.ema_network, self.num_classes, self.caption_dropout = None, None, o.caption_dropout
        self.sampler_name = diffusion.check_sampler(o.sampler or diffusion.default_sampler())
        self.sample_steps, self.guidance, self.control_scale = o.sample_steps, o.guidance, o.control_scale
        self.validation_data = o.validation_data
        self._val_items: list[dict] | None = None

    def validation_pairs(self, n: int) -> list[dict]:
        """The first `n` val items of the training data (read once, then kept)."""
        if self._val_items is None or len(self._val_items) < n:
            self._val_items = validation_items(self.validation_data, n)
        return self._val_items[:n]

    def sample_conditions(self, n: int, sketch: Any, prompt: str | list[str] | None) -> tuple[torch.Tensor, list[str]]:
        """`sample`'s inputs: (n sketches (n, 3, H, W) in [0, 1], n prompts); with no sketch, the first
        val pairs' sketches and captions."""
        if sketch is None:
            pairs = self.validation_pairs(n)
            if not pairs:
                raise GenlabError("controlnet: no sketch given and no validation data; pass --sketch PATH.")
            sketch = torch.stack([item["sketch"] for item in pairs])
            default_prompts = [item.get("caption", "") for item in pairs]
        else:
            default_prompts = [""]
        return load_sketch(sketch, self.image_size, n), as_list(prompt, n, default_prompts)

    @torch.no_grad()
    def sample_pairs(self, n: int, seed: int, **options: Any) -> torch.Tensor:
        """`sketch | output` side by side for the first `n` val pairs: (n, 3, H, 2W) in [-1, 1]."""
        pairs = self.validation_pairs(n)
        sketches = load_sketch(torch.stack([item["sketch"] for item in pairs]), self.image_size, n)
        images = self.sample(n, seed, **options)
        return torch.cat([sketches.to(images.device) * 2 - 1, images], dim=3)
