"""Which pipeline a `model.base` is, and single-file bases made into diffusers directories.

`model.base` may be a hub id, a diffusers directory, a genlab run or a single `.safetensors`
checkpoint (the form most downloads take). The kind is read from `model_index.json`'s class
name, or for a single file from its key names (structure, not sizes, so tiny stand-ins of
each architecture are recognised too):

| kind | pipelines | single-file keys |
|---|---|---|
| sd   | StableDiffusionPipeline (1.x, 2.x) | model.diffusion_model.input_blocks.*, cond_stage_model.* |
| sdxl | StableDiffusionXLPipeline | conditioner.embedders.* |
| sd3  | StableDiffusion3Pipeline | (model.diffusion_model.)joint_blocks.* |
| flux | FluxPipeline | (model.diffusion_model.)double_blocks.* |
| qwen-image | QwenImagePipeline | (directories only) |
| z-image | ZImagePipeline | (directories only) |
| sana | SanaPipeline | (directories only) |
| flux2-klein | Flux2KleinPipeline | (directories only: Flux.2 files also hold double_blocks.*) |

A single file is converted once by diffusers' `from_single_file` (with `model.base_config`,
a diffusers directory or hub id whose configs describe the same architecture, so nothing is
downloaded) and saved as a diffusers directory under the genlab cache; everything after
that (resume, sample, eval, plain-diffusers loading of exports) reads that directory. It
costs the checkpoint's size again on disk, once, instead of a conversion in every process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from genlab.config import save_to_cache
from genlab.errors import ConfigError, GenlabError
from genlab.run_dir import RunDir

KINDS = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3.x", "flux": "Flux", "qwen-image": "Qwen-Image",
         "z-image": "Z-Image", "sana": "Sana", "flux2-klein": "Flux.2 [klein]"}
SUPPORTED = ("genlab supports Stable Diffusion 1.x/2.x, SDXL, SD3.x, Flux, Qwen-Image, Z-Image, Sana and "
             "Flux.2 [klein] bases")
# model_index.json `_class_name` -> kind (text-to-image pipelines and their ControlNet twins).
PIPELINE_KINDS = {
    "StableDiffusionPipeline": "sd", "StableDiffusionControlNetPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLControlNetPipeline": "sdxl",
    "StableDiffusionXLControlNetUnionPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3ControlNetPipeline": "sd3",
    "FluxPipeline": "flux", "FluxControlNetPipeline": "flux",
    "QwenImagePipeline": "qwen-image", "QwenImageControlNetPipeline": "qwen-image",
    "ZImagePipeline": "z-image", "ZImageControlNetPipeline": "z-image",
    "SanaPipeline": "sana", "SanaControlNetPipeline": "sana",
    "Flux2KleinPipeline": "flux2-klein",  # diffusers has no Flux.2 ControlNet pipeline
}
# Single-file key prefixes (after an optional "model.diffusion_model.") -> kind, checked in order:
# an SDXL file also has input_blocks, so its second text encoder decides first.
SINGLE_FILE_KEYS = [("conditioner.embedders.", "sdxl"), ("joint_blocks.", "sd3"), ("double_blocks.", "flux"),
                    ("input_blocks.", "sd")]
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "qwen-image": "QwenImagePipeline",
                    "z-image": "ZImagePipeline", "sana": "SanaPipeline", "flux2-klein": "Flux2KleinPipeline"}


def a_kind(kind: str) -> str:
    """The kind's name with its article, for sentences: "an SDXL", "a Flux", "a Qwen-Image"."""
    name = KINDS[kind]
    return f"{'an' if name.startswith('SD') else 'a'} {name}"


def is_single_file(base: str) -> bool:
    """Whether `base` names one checkpoint file rather than a directory or hub id."""
    return Path(str(base)).expanduser().is_file()


def single_file_kind(path: str | Path) -> str:
    """The kind of a single-file checkpoint, from its key names (no tensor is read)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise GenlabError(f"model.base={path}: single-file bases are read as .safetensors only (no pickled .ckpt); "
                          "convert it or use its diffusers directory.")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise GenlabError(f"model.base={path}: not a readable .safetensors file ({e}).") from e
    stripped = [k.removeprefix("model.diffusion_model.") for k in keys]
    for prefix, kind in SINGLE_FILE_KEYS:
        if any(k.startswith(prefix) for k in stripped):
            return kind
    raise ConfigError(f"model.base={path}: found a checkpoint with {len(keys)} tensors (first: "
                      f"{keys[0] if keys else 'none'}) that is none of the known layouts; {SUPPORTED}.")


def pipeline_class_name(base: str) -> str:
    """`_class_name` of the base's model_index.json (a diffusers directory, a genlab run or a hub id)."""
    from diffusers import DiffusionPipeline

    path = Path(str(base)).expanduser()
    if (run := RunDir(path)).is_run():
        path = run.export  # a genlab run
    where = str(path) if path.exists() else str(base)
    try:
        return DiffusionPipeline.load_config(where)["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise GenlabError(f"model.base={base}: no diffusers pipeline there (no readable model_index.json); give a "
                          "pipeline directory, a genlab sd run, a hub id or a single .safetensors file.") from e


def base_kind(base: str) -> str:
    """A key of KINDS ("sd", "sdxl", "sd3", "flux", "qwen-image", "z-image", "sana", "flux2-klein") for a
    `model.base`, or a ConfigError naming what was found."""
    if is_single_file(base):
        return single_file_kind(base)
    name = pipeline_class_name(base)
    if name not in PIPELINE_KINDS:
        raise ConfigError(f"model.base={base} is a {name}; {SUPPORTED}.")
    return PIPELINE_KINDS[name]


def require_kind(base: str, kinds: tuple[str, ...], what: str) -> str:
    """The base's kind when `what` (a family, a feature) supports it, else one ConfigError sentence."""
    kind = base_kind(base)
    if kind not in kinds:
        names = ", ".join(KINDS[k] for k in kinds)
        raise ConfigError(f"model.base={base} is {a_kind(kind)} base; {what} supports {names} bases.")
    return kind


def diffusers_dir(base: str, base_config: str | None = None) -> str:
    """Where diffusers' `from_pretrained` finds the base: `base` itself, or for a single file the
    diffusers directory it was converted to (once, under the genlab cache).

    Args:
        base: the `model.base` value.
        base_config: for a single file, a diffusers directory or hub id with the configs of the
            same architecture (None: diffusers' default repository for the kind, which needs the
            network once).
    """
    if not is_single_file(base):
        return str(base)
    from genlab.config import cache_root

    path = Path(str(base)).expanduser().resolve()
    kind = single_file_kind(path)
    stat = path.stat()
    key = json.dumps([str(path), stat.st_size, stat.st_mtime_ns, str(base_config)])
    target = cache_root() / "bases" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (target / "model_index.json").exists():
        _convert(path, kind, base_config, target)
    return str(target)


def _convert(path: Path, kind: str, base_config: str | None, target: Path) -> None:
    """`from_single_file` -> `save_pretrained`, into a temporary folder renamed into place."""
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASSES[kind])
    config = diffusers_dir(base_config) if base_config else None
    try:
        pipe = cls.from_single_file(str(path), config=config, local_files_only=bool(config) or None)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        hint = "" if config else " (set model.base_config to a diffusers directory of the same architecture)"
        raise GenlabError(f"model.base={path}: cannot load it as {a_kind(kind)} single file{hint}: "
                          f"{str(e).splitlines()[0]}") from e
    save_to_cache(target, pipe.save_pretrained)  # another process may convert it at the same time
