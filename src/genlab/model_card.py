"""The model card of an export: export/README.md, the way models on the Hugging Face Hub are documented.

Its YAML header (library_name, pipeline_tag, base_model, license, tags, datasets) is what the
Hub reads to file and display the model; the body says how to load it, how it was trained
(the command, the data, the config), what `genlab eval` measured and what it draws. It is
written when training exports and rewritten by `genlab eval` (so its metrics are those of
eval/metrics.json) and by `genlab push` (so its snippets name the Hub repository).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from genlab.errors import GenlabError
from genlab.run_dir import RunDir, atomic_write

log = logging.getLogger(__name__)

# Per family: the Hub's metadata and how to load the export. A VAE export is an
# AutoencoderKL, a part of a pipeline rather than one, so it gets no pipeline tag (the Hub
# would offer a widget that cannot run it); the GAN's safetensors + JSON is no Hub library's
# format, so it names none.
FAMILIES: dict[str, dict[str, Any]] = {
    "ddpm": {"library_name": "diffusers", "pipeline_tag": "unconditional-image-generation",
             "tags": ["diffusers", "ddpm", "diffusers:DDPMPipeline"], "what": "a DDPM (diffusers UNet2DModel + DDPMScheduler)",
             "use": 'from diffusers import DDPMPipeline\n\npipe = DDPMPipeline.from_pretrained("{where}")\n'
                    "images = pipe(batch_size=16).images"},
    # diffusers' DiTPipeline decodes with a VAE and assumes ImageNet's 1,000 classes: no pipeline fits a pixel DiT.
    "ddpm_dit": {"library_name": "diffusers", "pipeline_tag": "unconditional-image-generation",
                 "tags": ["diffusers", "dit", "diffusion-transformer"],
                 "what": "a pixel-space diffusion transformer (diffusers DiTTransformer2DModel in transformer/, "
                         "its scheduler in scheduler/)",
                 "use": "import torch\nfrom diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler\n\n"
                        'transformer = DiTTransformer2DModel.from_pretrained("{where}", subfolder="transformer")\n'
                        'scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("{where}", subfolder="scheduler")'
                        "  # flow runs; DDIMScheduler etc. otherwise\n"
                        "scheduler.set_timesteps(8)\nlabels = torch.arange(10)  # the class of each image\n"
                        "x = torch.randn(10, transformer.config.in_channels, transformer.config.sample_size, "
                        "transformer.config.sample_size)\n"
                        "with torch.no_grad():\n    for t in scheduler.timesteps:\n"
                        "        out = transformer(x, t.expand(len(x)), class_labels=labels).sample\n"
                        "        x = scheduler.step(out, t, x).prev_sample\nimages = (x.clamp(-1, 1) + 1) / 2"},
    "vae": {"library_name": "diffusers", "pipeline_tag": None, "tags": ["diffusers", "vae", "autoencoder"],
            "what": "a variational autoencoder (diffusers AutoencoderKL; its config holds the measured latent scaling_factor)",
            "use": 'from diffusers import AutoencoderKL\n\nvae = AutoencoderKL.from_pretrained("{where}")\n'
                   "latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor"},
    "gan": {"library_name": None, "pipeline_tag": "unconditional-image-generation", "tags": ["gan", "pytorch", "safetensors"],
            "what": "a GAN generator (generator.safetensors + generator_config.json)",
            "use": 'from genlab.families.gan import load_generator\n\ngenerator = load_generator("{where}")'},
    "sd": {"library_name": "diffusers", "pipeline_tag": "text-to-image",
           "tags": ["diffusers", "stable-diffusion", "text-to-image", "diffusers:StableDiffusionPipeline"],
           "what": "a Stable Diffusion text-to-image pipeline (U-Net, VAE, CLIP text encoder)",
           "use": 'from diffusers import StableDiffusionPipeline\n\npipe = StableDiffusionPipeline.from_pretrained("{where}")\n'
                  'image = pipe("a red circle on a blue background").images[0]'},
    "sd3": {"library_name": "diffusers", "pipeline_tag": "text-to-image",
            "tags": ["diffusers", "sd3", "mmdit", "flow-matching", "text-to-image", "diffusers:StableDiffusion3Pipeline"],
            "what": "an SD3-style text-to-image pipeline (MMDiT trained by rectified flow, VAE, two CLIP text encoders, no T5)",
            "use": 'from diffusers import StableDiffusion3Pipeline\n\n'
                   'pipe = StableDiffusion3Pipeline.from_pretrained("{where}", text_encoder_3=None, tokenizer_3=None)\n'
                   'image = pipe("a red circle on a blue background", max_sequence_length=1).images[0]'},
    # "controlnet": by the base kind it was trained on, see CONTROLNET_BASES and controlnet_spec.
}
# A ControlNet by its base's kind (genlab.families.bases): the Hub's tag for the base, diffusers' ControlNet
# model and pipeline classes (the Hub derives a pipeline tag from model_index.json, which a ControlNet export lacks).
CONTROLNET_BASES = {"sd": ("stable-diffusion", "ControlNetModel", "StableDiffusionControlNetPipeline"),
                    "sdxl": ("stable-diffusion-xl", "ControlNetModel", "StableDiffusionXLControlNetPipeline"),
                    "sd3": ("sd3", "SD3ControlNetModel", "StableDiffusion3ControlNetPipeline"),
                    "flux": ("flux", "FluxControlNetModel", "FluxControlNetPipeline")}
# What diffusers' U-Net pipelines ask of a scheduler and flow schedulers lack (genlab.diffusion.for_unet_pipelines).
FLOW_UNET_LINES = ("pipe.scheduler.init_noise_sigma = 1.0  # the base was trained by rectified flow\n"
                   "pipe.scheduler.scale_model_input = lambda sample, timestep: sample")
DATA = {"digits": "scikit-learn's bundled digits (1,797 real 8x8 images of 0-9, upsampled)",
        "fill_circles": "fill_circles, generated by genlab: circle outlines (sketches), filled circles and colour captions"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(value: Any) -> str | None:
    """`value` when it is a Hub repository id ("org/name"), not a local path."""
    if not isinstance(value, str) or Path(value).expanduser().exists() or not HUB_ID.match(value):
        return None
    return value


def family_of(config: dict[str, Any]) -> str:
    """ddpm | ddpm_dit | vae | gan | sd | controlnet, from the model's `_target_` (genlab.families.<module>.<Class>)."""
    target = str(config.get("model", {}).get("_target_", ""))
    module = target.split(".")[2] if target.startswith("genlab.families.") and target.count(".") >= 3 else ""
    if module == "ddpm" and config.get("model", {}).get("backbone") == "dit":
        return "ddpm_dit"  # exported as transformer/ + scheduler/, not a DDPMPipeline
    if module == "sd" and config.get("model", {}).get("backbone") == "mmdit":
        return "sd3"  # model=sd on the MMDiT is the sd3 family: a StableDiffusion3Pipeline export
    return module or "unknown"


def flow_unet_base(base: Any) -> bool:
    """Whether a ControlNet's base is an SD/SDXL U-Net that samples with a flow scheduler (a genlab
    `model=sd model.objective=flow` run). False when the base cannot be read (e.g. a hub id offline)."""
    from genlab.families import bases
    from genlab.families import latent_diffusion as ld

    if not base:
        return False
    try:
        kind, scheduler = bases.base_kind(str(base)), ld.base_scheduler(str(base))
    except (GenlabError, OSError, ValueError):
        return False
    return kind in ("sd", "sdxl") and type(scheduler).__name__.startswith("FlowMatch")


def controlnet_base_kind(config: dict[str, Any], info: dict[str, Any] | None = None) -> str:
    """sd | sdxl | sd3 | flux: the base a ControlNet run was trained on, as its export says (genlab_export.json),
    else as model.base reads; "sd" when neither can be read (a hub id offline)."""
    from genlab.families import bases

    if (info or {}).get("base_kind") in CONTROLNET_BASES:
        return info["base_kind"]
    try:
        return bases.base_kind(str(config.get("model", {}).get("base")))
    except (GenlabError, OSError, ValueError):
        return "sd"


ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def controlnet_adapter(kind: str, lora: dict[str, Any] | None, where: str = "EXPORT") -> tuple[str, list[str]]:
    """A ControlNet export's base adapter: where it is (for "what") and the lines that load it into `pipe`
    (for "use"), by variant; ("", []) when trained without one."""
    from genlab.families.lora_variants import DIFFUSERS_LOADABLE

    lora = lora or {}
    if not lora.get("rank"):
        return "", []
    variant = lora.get("variant") or "lora"
    name = ADAPTER_NAMES.get(variant, variant)
    transformer = kind in ("sd3", "flux")
    if variant in DIFFUSERS_LOADABLE:
        return (f"the base {'transformer' if transformer else 'U-Net'}'s {name} in pytorch_lora_weights.safetensors",
                [f'pipe.load_lora_weights("{where}")'])
    if transformer:  # diffusers' loaders refuse LoHa/LoKr: peft's own directory, which adapts pipe.transformer in place
        return (f"the base transformer's {name} in transformer_adapter/ (peft)",
                ["from peft import PeftModel", f'PeftModel.from_pretrained(pipe.transformer, "{where}/transformer_adapter")'])
    return (f"the base U-Net's {name} in lora_kohya.safetensors (kohya/ComfyUI; diffusers has no loader)",
            ["# the U-Net's LoHa/LoKr is in lora_kohya.safetensors, for kohya/ComfyUI: diffusers cannot load it"])


def controlnet_spec(kind: str, lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """FAMILIES' entry for a ControlNet on a base of `kind` (its "use" is _controlnet_use's); `lora`: model.lora."""
    from genlab.families.bases import KINDS

    tag, _, pipeline = CONTROLNET_BASES[kind]
    adapter, _ = controlnet_adapter(kind, lora)
    return {"library_name": "diffusers", "pipeline_tag": "text-to-image",
            "tags": ["diffusers", "controlnet", tag, "text-to-image", f"diffusers:{pipeline}"],
            "what": f"a ControlNet that makes its {KINDS[kind]} base follow a sketch (controlnet/"
                    f"{', plus ' + adapter if adapter else ''})"}


def spec_of(family: str, config: dict[str, Any], info: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The family's FAMILIES entry (a ControlNet's by its base kind); None for a family without one."""
    if family == "controlnet":
        return controlnet_spec(controlnet_base_kind(config, info), config.get("model", {}).get("lora"))
    return FAMILIES.get(family)


def metadata(config: dict[str, Any], data_choice: str | None, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's YAML header fields for this run's config (`info`: a ControlNet export's genlab_export.json)."""
    family = family_of(config)
    spec = spec_of(family, config, info) or {"library_name": None, "pipeline_tag": None, "tags": []}
    model, data, card = config.get("model", {}), config.get("data", {}), config.get("card") or {}
    base = hub_id(model.get("base"))
    built_on = model.get("base") is not None
    tags = ["genlab", *spec["tags"], *(["lora"] if (model.get("lora") or {}).get("rank") else []), *card.get("tags", [])]
    fields = {"library_name": spec["library_name"], "pipeline_tag": spec["pipeline_tag"], "base_model": base,
              # A model trained from scratch is the user's to license; one built on a base inherits the base's terms.
              "license": card.get("license") or ("other" if built_on else "apache-2.0"),
              "tags": list(dict.fromkeys(tags)), "datasets": [data["name"]] if data_choice == "hf" and data.get("name") else None}
    return {k: v for k, v in fields.items() if v}


def write_model_card(run: RunDir, repo_id: str | None = None) -> Path:
    """Write RUN/export/README.md (and export/samples.png, the final sample grid); returns the card's path.

    Args:
        repo_id: the Hub repository the export goes to (its snippets load from there); default the local path.

    Raises:
        GenlabError: the run has no export/ yet, or its config cannot be read.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from genlab.report.collect import resolved

    if not run.export.is_dir():
        raise GenlabError(f"{run.path} has no export/ yet (training writes it when it finishes); "
                          f"finish the run first (`genlab resume {run.path}`).")
    config = resolved(run.read_config_data())
    grids = run.sample_grids()  # never a link out of the run
    if grids:  # copied beside, then renamed over: a link at export/samples.png is replaced, never written through
        tmp = run.export / ".samples.png.tmp"
        shutil.copyfile(grids[-1][1], tmp)
        tmp.replace(run.export / "samples.png")
    header = ModelCardData(**metadata(config, run.choices().get("data"), _export_info(run))).to_yaml()
    body = _body(run, config, repo_id or str(run.export.resolve()), has_grid=bool(grids))
    card = ModelCard(f"---\n{header}\n---\n\n{body}")
    atomic_write(run.export / "README.md", str(card))
    return run.export / "README.md"


def without_local_paths(config: Any) -> Any:
    """The config as a card shows it: an absolute local path (`data.path=/home/me/photos`) becomes its basename.

    A card is published; where the author's files lie on their machine is theirs.
    """
    if isinstance(config, dict):
        return {k: without_local_paths(v) for k, v in config.items()}
    if isinstance(config, list):
        return [without_local_paths(v) for v in config]
    if isinstance(config, str) and _LOCAL_PATH.fullmatch(config):
        return Path(config).name or config
    return config


_LOCAL_PATH = re.compile(r"(?:~|/|[A-Za-z]:[\\/])[^\s'\"]*")


def _command_without_local_paths(line: str) -> str:
    """`genlab train data.path=/home/me/photos` -> `genlab train data.path=photos` (see without_local_paths)."""
    return re.sub(r"(?<=[\s=])(?:~|/)[^\s'\"]*", lambda m: Path(m.group()).name or m.group(), line)


def refresh_model_card(run: RunDir) -> None:
    """Rewrite the card when the run has an export; a failure is a warning, never the end of a training or an eval."""
    if not run.export.is_dir():
        return
    try:
        write_model_card(run)
    except Exception as error:
        log.warning("could not write the model card %s (%s); `genlab push` writes it again.", run.export / "README.md", error)


def _body(run: RunDir, config: dict[str, Any], where: str, has_grid: bool) -> str:
    import yaml

    family = family_of(config)
    info = _export_info(run) if family == "controlnet" else {}
    spec = spec_of(family, config, info) or {"what": f"a genlab {family} model", "use": ""}
    model, data, trainer = config.get("model", {}), config.get("data", {}), config.get("trainer", {})
    choice = run.choices().get("data") or str(data.get("_target_", "?")).rsplit(".", 1)[-1].lower()
    status, metrics = run.read_status(), run.read_metrics()
    steps = metrics[-1]["step"] if metrics else status.get("step", "?")  # status says "running" until after export
    title = f"{family.upper() if family in ('ddpm', 'vae', 'gan', 'sd') else family} on {choice}"
    lines = [f"# {title}", "",
             f"This is {spec['what']}, trained with genlab for {steps} optimizer steps on "
             f"{DATA.get(choice, choice)} at {data.get('image_size', '?')} px.", ""]
    if has_grid:
        lines += ["![Samples from the final weights, fixed noise](samples.png)", ""]
    if family == "controlnet" or spec.get("use"):
        use = _controlnet_use(config, info, where) if family == "controlnet" else spec["use"].format(where=where)
        lines += ["## How to use", "", "```python", use, "```", ""]
        if family == "ddpm" and model.get("conditional"):
            lines += [f"Class-conditional ({model.get('num_classes')} classes): the network takes `class_labels`, "
                      "which diffusers' stock pipeline does not pass; `genlab sample RUN --class K` draws class K.", ""]
        if family == "sd" and model.get("objective") == "flow":  # see genlab.diffusion.for_unet_pipelines
            lines += ["Trained by rectified flow: `StableDiffusionPipeline` asks its scheduler for two things flow "
                      "schedulers lack, so set them after loading: `pipe.scheduler.init_noise_sigma = 1.0` and "
                      "`pipe.scheduler.scale_model_input = lambda sample, timestep: sample`.", ""]
    lines += ["## Training", "", "The command that made it:", "", "```bash",
              *map(_command_without_local_paths, run.command()), "```", ""]
    lines += _training_facts(without_local_paths(model), without_local_paths(data), trainer, choice, metrics)
    lines += ["## Evaluation", "", *_eval_lines(run)]
    lines += ["## Config", "", "<details><summary>The run's config (.hydra/config.yaml)</summary>", "", "```yaml",
              yaml.safe_dump(without_local_paths(config), sort_keys=False, default_flow_style=None, width=120).rstrip(),
              "```", "", "</details>", ""]
    return "\n".join(lines)


def _export_info(run: RunDir) -> dict[str, Any]:
    """export/genlab_export.json (what a ControlNet export was trained on), {} when absent or unreadable."""
    import json

    try:
        return json.loads((run.export / "genlab_export.json").read_text())
    except (OSError, ValueError):
        return {}


def _controlnet_use(config: dict[str, Any], info: dict[str, Any], where: str) -> str:
    """The loading code of a ControlNet export in the ControlNet pipeline of its base's kind."""
    kind = controlnet_base_kind(config, info)
    _, controlnet, pipeline = CONTROLNET_BASES[kind]
    model = config.get("model", {})
    base = info.get("base") or model.get("base") or "BASE"
    _, adapter_lines = controlnet_adapter(kind, model.get("lora"), where)
    lines = [f"from diffusers import {controlnet}, {pipeline}", "",
             f'controlnet = {controlnet}.from_pretrained("{where}", subfolder="controlnet")']
    if kind in ("sd3", "flux"):
        from diffusers import DiffusionPipeline

        try:  # a base without T5 (a genlab sd3 run) lists it as null; diffusers then wants it passed as None
            no_t5 = DiffusionPipeline.load_config(base).get("text_encoder_3") == [None, None]
        except (OSError, ValueError):
            no_t5 = False
        lines += [f'pipe = {pipeline}.from_pretrained("{base}", controlnet=controlnet'
                  f'{", text_encoder_3=None, tokenizer_3=None" if no_t5 else ""})',
                  *adapter_lines,
                  f'image = pipe("a red circle on a blue background", control_image=sketch, '
                  f'max_sequence_length={info.get("max_sequence_length")}).images[0]']
        return "\n".join(lines)
    lines += [f'pipe = {pipeline}.from_pretrained("{base}", controlnet=controlnet)',
              *adapter_lines]
    if flow_unet_base(base):
        lines.append(FLOW_UNET_LINES)  # the same two as for the flow SD base itself
    lines.append('image = pipe("a red circle on a blue background", image=sketch).images[0]')
    return "\n".join(lines)


def _training_facts(model: dict, data: dict, trainer: dict, choice: str, metrics: list[dict]) -> list[str]:
    facts = [f"- data: `data={choice}`: {DATA.get(choice, data.get('name') or data.get('path') or choice)}; "
             f"{data.get('image_size', '?')} px, {data.get('channels', '?')} channel(s)",
             f"- optimizer steps: {trainer.get('max_steps', '?')} planned, batch {trainer.get('batch_size', '?')} "
             f"x grad_accum {trainer.get('grad_accum', 1)} per device, lr {trainer.get('lr', '?')}, "
             f"precision {trainer.get('mixed_precision', 'no')}, EMA {trainer.get('ema')}"]
    if model.get("base"):
        facts.append(f"- base model: `{model['base']}`")
    last = next((row for row in reversed(metrics) if any("loss" in k for k in row)), {})
    if last:
        facts.append("- last logged: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()
                                                   if "loss" in k and isinstance(v, (int, float))) + f" at step {last['step']}")
    return [*facts, ""]


def _eval_lines(run: RunDir) -> list[str]:
    report = run.read_eval()
    metrics = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seconds"}
    if not metrics:
        return [f"Not evaluated yet: `genlab eval {run.path.name}` measures it and updates this card.", ""]
    rows = [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
    where = f"checkpoint `{report.get('checkpoint', '?')}`{', EMA weights' if report.get('ema') else ''}"
    return [f"From `genlab eval` (eval/metrics.json, {where}):", "", "| metric | value |", "|---|---|", *rows, ""]
