"""What the model card of a ControlNet export says: it depends on the base's kind (SD 1.x/2.x, SDXL, SD3.x,
Flux, Qwen-Image) and on the adapter trained on the base, so `UNetControlNet` and `FlowControlNet` declare their card
through `card_for` (families.contract.CardByConfig), which asks here.

`export` is the export's genlab_export.json (what training wrote: the base's kind, the base, the
text length), so a card of a run on a Hub base is written without downloading it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from genlab.errors import GenlabError
from genlab.families.contract import Card

# A ControlNet by its base's kind (genlab.families.base_kinds): the Hub's tag for the base, diffusers' ControlNet
# model and pipeline classes (the Hub derives a pipeline tag from model_index.json, which a ControlNet export lacks).
CONTROLNET_BASES = {"sd": ("stable-diffusion", "ControlNetModel", "StableDiffusionControlNetPipeline"),
                    "sdxl": ("stable-diffusion-xl", "ControlNetModel", "StableDiffusionXLControlNetPipeline"),
                    "sd3": ("sd3", "SD3ControlNetModel", "StableDiffusion3ControlNetPipeline"),
                    "flux": ("flux", "FluxControlNetModel", "FluxControlNetPipeline"),
                    "qwen-image": ("qwen-image", "QwenImageControlNetModel", "QwenImageControlNetPipeline"),
                    "z-image": ("z-image", "ZImageControlNetModel", "ZImageControlNetPipeline"),
                    "sana": ("sana", "SanaControlNetModel", "SanaControlNetPipeline")}
#: The hub tag of a base kind with no ControlNet (model=lora only).
LORA_ONLY_TAGS = {"flux2-klein": "flux2"}
#: SDXL's union ControlNet (model.controlnet.union=true): several control types in one model.
UNION = ("stable-diffusion-xl", "ControlNetUnionModel", "StableDiffusionXLControlNetUnionPipeline")
UNET_KINDS = ("sd", "sdxl")  # every other kind's denoiser is a transformer
# What a plain pipeline call must add to sample as genlab does: Z-Image's default conditioning scale is 0.75,
# Sana's pipeline bins small sizes up to its training resolutions.
CALL_OPTIONS = {"z-image": "controlnet_conditioning_scale=1.0, ", "sana": "use_resolution_binning=False, "}
# What diffusers' U-Net pipelines ask of a scheduler and flow schedulers lack (genlab.diffusion.for_unet_pipelines).
FLOW_UNET_LINES = ("pipe.scheduler.init_noise_sigma = 1.0  # the base was trained by rectified flow\n"
                   "pipe.scheduler.scale_model_input = lambda sample, timestep: sample")

def flow_unet_base(base: Any) -> bool:
    """Whether a ControlNet's base is an SD/SDXL U-Net that samples with a flow scheduler (a genlab
    `model=sd model.objective=flow` run). False when the base cannot be read (e.g. a hub id offline)."""
    from genlab.families import base_kinds
    from genlab.families import latent_diffusion as ld

    if not base:
        return False
    try:
        kind, scheduler = base_kinds.base_kind(str(base)), ld.base_scheduler(str(base))
    except (GenlabError, OSError, ValueError):
        return False
    return kind in ("sd", "sdxl") and type(scheduler).__name__.startswith("FlowMatch")


def controlnet_base_kind(model: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> str:
    """A key of CONTROLNET_BASES (sd, sdxl, sd3, flux, qwen-image): the base a ControlNet run was trained on, as its export says (genlab_export.json),
    else as model.base reads; "sd" when neither can be read (a hub id offline)."""
    from genlab.families import base_kinds

    if (info or {}).get("base_kind") in CONTROLNET_BASES:
        return info["base_kind"]
    try:
        return base_kinds.base_kind(str(model.get("base")))
    except (GenlabError, OSError, ValueError):
        return "sd"


def union_modes(model: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> dict[str, int] | None:
    """A union ControlNet's {control: slot} (its export's genlab_export.json, else model.controlnet), or None
    for a plain ControlNet."""
    info = info or {}
    if info.get("controlnet_class"):
        return dict(info.get("control_modes") or {}) if info["controlnet_class"] == UNION[1] else None
    cfg = model.get("controlnet") or {}
    return dict(cfg.get("control_modes") or {"sketch": 2}) if cfg.get("union") else None


def controlnet_classes(kind: str, union: bool) -> tuple[str, str, str]:
    """(Hub tag, ControlNet class, pipeline class) of a ControlNet on a base of `kind`."""
    return UNION if union and kind == "sdxl" else CONTROLNET_BASES[kind]


ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def controlnet_adapter(kind: str, lora: Mapping[str, Any] | None, where: str = "EXPORT") -> tuple[str, list[str]]:
    """A ControlNet export's base adapter: where it is (for "what") and the lines that load it into `pipe`
    (for "use"), by variant; ("", []) when trained without one."""
    from genlab.families.lora_variants import DIFFUSERS_LOADABLE

    lora = lora or {}
    if not lora.get("rank"):
        return "", []
    variant = lora.get("variant") or "lora"
    name = ADAPTER_NAMES.get(variant, variant)
    transformer = kind not in UNET_KINDS
    if variant in DIFFUSERS_LOADABLE:
        return (f"the base {'transformer' if transformer else 'U-Net'}'s {name} in pytorch_lora_weights.safetensors",
                [f'pipe.load_lora_weights("{where}")'])
    if transformer:  # diffusers' loaders refuse LoHa/LoKr: peft's own directory, which adapts pipe.transformer in place
        return (f"the base transformer's {name} in transformer_adapter/ (peft)",
                ["from peft import PeftModel", f'PeftModel.from_pretrained(pipe.transformer, "{where}/transformer_adapter")'])
    return (f"the base U-Net's {name} in lora_kohya.safetensors (kohya/ComfyUI; diffusers has no loader)",
            ["# the U-Net's LoHa/LoKr is in lora_kohya.safetensors, for kohya/ComfyUI: diffusers cannot load it"])


def controlnet_spec(kind: str, lora: Mapping[str, Any] | None = None, modes: Mapping[str, int] | None = None) -> Card:
    """The card of a ControlNet on a base of `kind` without its loading code (`controlnet_use`); `lora`: model.lora;
    `modes`: a union ControlNet's {control: slot} (None: a plain ControlNet)."""
    from genlab.families.base_kinds import KINDS

    tag, model_class, pipeline = controlnet_classes(kind, modes is not None)
    adapter, _ = controlnet_adapter(kind, lora)
    what = f"a ControlNet that makes its {KINDS[kind]} base follow a sketch" if modes is None else (
        f"a union ControlNet ({model_class}: {', '.join(f'{k} in control_mode {v}' for k, v in modes.items())}) "
        f"that makes its {KINDS[kind]} base follow its control images")
    return Card(what=f"{what} (controlnet/"
                     f"{', plus ' + adapter if adapter else ''})", title="controlnet", library_name="diffusers",
                pipeline_tag="text-to-image",
                tags=("diffusers", "controlnet", tag, "text-to-image", f"diffusers:{pipeline}"))


def controlnet_card(model: Mapping[str, Any], export: Mapping[str, Any]) -> Card:
    """The whole card of a ControlNet run: by its base's kind, with the code that loads its export."""
    kind = controlnet_base_kind(model, export)
    return replace(controlnet_spec(kind, model.get("lora"), union_modes(model, export)),
                   use=controlnet_use(model, export, "{where}"))


def controlnet_use(model: Mapping[str, Any], info: Mapping[str, Any], where: str) -> str:
    """The loading code of a ControlNet export in the ControlNet pipeline of its base's kind."""
    kind = controlnet_base_kind(model, info)
    modes = union_modes(model, info)
    _, controlnet, pipeline = controlnet_classes(kind, modes is not None)
    base = info.get("base") or model.get("base") or "BASE"
    _, adapter_lines = controlnet_adapter(kind, model.get("lora"), where)
    lines = [f"from diffusers import {controlnet}, {pipeline}", "",
             f'controlnet = {controlnet}.from_pretrained("{where}", subfolder="controlnet")']
    if kind not in UNET_KINDS:
        from diffusers import DiffusionPipeline

        try:  # a base without T5 (a genlab sd3 run) lists it as null; diffusers then wants it passed as None
            no_t5 = DiffusionPipeline.load_config(base).get("text_encoder_3") == [None, None]
        except (OSError, ValueError):
            no_t5 = False
        lines += [f'pipe = {pipeline}.from_pretrained("{base}", controlnet=controlnet'
                  f'{", text_encoder_3=None, tokenizer_3=None" if no_t5 else ""})',
                  *adapter_lines,
                  f'image = pipe("a red circle on a blue background", control_image=sketch, '
                  f'{CALL_OPTIONS.get(kind, "")}'
                  f'max_sequence_length={info.get("max_sequence_length")}).images[0]']
        return "\n".join(lines)
    lines += [f'pipe = {pipeline}.from_pretrained("{base}", controlnet=controlnet)',
              *adapter_lines]
    if flow_unet_base(base):
        lines.append(FLOW_UNET_LINES)  # the same two as for the flow SD base itself
    if modes is not None and kind == "sdxl":
        first, slot = next(iter(modes.items()), ("sketch", 2))
        lines += [f"# control_mode: the union slot of the control image ({modes})",
                  f'image = pipe("a red circle on a blue background", control_image=[{first}], '
                  f'control_mode=[{slot}]).images[0]']
        return "\n".join(lines)
    lines.append('image = pipe("a red circle on a blue background", image=sketch).images[0]')
    return "\n".join(lines)


class ControlNetFamily:
    """What `UNetControlNet` (SD and SDXL bases) and `FlowControlNet` (SD3.x and Flux) declare (families/contract.py):
    one family, whatever its base, whose card is by the base's kind and the adapter trained on it."""

    name = "controlnet"
    card = Card(what="a ControlNet that makes its base follow a sketch (controlnet/)", title="controlnet",
                library_name="diffusers", pipeline_tag="text-to-image", tags=("diffusers", "controlnet", "text-to-image"))
    losses = ("loss",)
    metrics: dict[str, str] = {}

    @classmethod
    def card_for(cls, model: Mapping[str, Any], export: Mapping[str, Any] | None = None) -> Card:
        """The card of a ControlNet run, with the code that loads its export."""
        return controlnet_card(model, export or {})
