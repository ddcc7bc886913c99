"""ControlNets for the transformer bases trained with flow matching: SD3.x and Flux.

What is here: the ControlNet built from the base's own transformer (diffusers'
`SD3ControlNetModel.from_transformer`, `FluxControlNetModel.from_transformer`: a copy of its
first blocks with zero-initialised outputs), its export as a diffusers model directory, and
the matching diffusers pipeline over the base's parts, the one plain-diffusers users load
the export into. Training it needs the flow-matching objective (velocity target, shifted
timestep sampling) of the shared diffusion core (issue 14), which `model=controlnet` does
not have yet: a SD3.x or Flux `model.base` is refused there in one sentence.

The sketch enters both as the VAE latents of the control image (the pipelines encode it);
SD3's ControlNet has no extra conditioning channels, Flux's takes packed 2x2 latent patches.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from genlab.families import bases
from genlab.families import latent_diffusion as ld

# (ControlNet class, transformer class, ControlNet pipeline class) per base kind, by name in diffusers.
CLASSES = {"sd3": ("SD3ControlNetModel", "SD3Transformer2DModel", "StableDiffusion3ControlNetPipeline"),
           "flux": ("FluxControlNetModel", "FluxTransformer2DModel", "FluxControlNetPipeline")}


def _diffusers(name: str):
    import diffusers

    return getattr(diffusers, name)


def build_controlnet(base: str, num_layers: int | None = None, num_single_layers: int | None = None) -> nn.Module:
    """The ControlNet of an SD3.x or Flux base: its transformer's first `num_layers` blocks, copied.

    Args:
        base: the base (anything `model.base` takes).
        num_layers: joint (MMDiT) blocks to copy; None: SD3 half of them (the SD3.5 Large ControlNets
            copy 19 of 38; the last block, which reads but no longer updates the text, cannot be
            copied), Flux 4 (as diffusers' train_controlnet_flux.py).
        num_single_layers: Flux's single-stream blocks to copy; None: 0 (the same recipe).
    """
    kind = bases.require_kind(str(base), tuple(CLASSES), "a flow-matching ControlNet")
    transformer = ld.load_pretrained(_diffusers(CLASSES[kind][1]), bases.diffusers_dir(str(base)), "transformer")
    return controlnet_for(kind, transformer, num_layers, num_single_layers)


def controlnet_for(kind: str, transformer: nn.Module, num_layers: int | None = None,
                   num_single_layers: int | None = None) -> nn.Module:
    """`build_controlnet` on a transformer in hand (also on the meta device, for sizes)."""
    controlnet_cls = _diffusers(CLASSES[kind][0])
    if kind == "sd3":
        # Build from a copy of the config: from_transformer writes into the one it is given.
        return controlnet_cls.from_transformer(_ConfigCopy(transformer), num_extra_conditioning_channels=0,
                                               num_layers=num_layers or max(1, transformer.config.num_layers // 2))
    config = transformer.config
    return controlnet_cls.from_transformer(transformer, num_layers=num_layers or 4,
                                           num_single_layers=num_single_layers or 0,
                                           attention_head_dim=config.attention_head_dim,
                                           num_attention_heads=config.num_attention_heads)


class _ConfigCopy:
    """A transformer seen through a writable copy of its config (for SD3's `from_transformer`)."""

    def __init__(self, transformer: nn.Module):
        self._transformer, self.config = transformer, dict(transformer.config)

    def __getattr__(self, name):
        return getattr(self._transformer, name)


def export(controlnet: nn.Module, out_dir: Path) -> Path:
    """`out_dir/controlnet/`: a diffusers model directory its ControlNet pipeline loads."""
    target = Path(out_dir) / "controlnet"
    ld.unwrap(controlnet).save_pretrained(target)
    return target


def pipeline(base: str, controlnet: nn.Module):
    """The diffusers ControlNet pipeline of the base's kind over the base's parts and `controlnet`."""
    kind = bases.base_kind(str(base))
    pipe = _diffusers(CLASSES[kind][2]).from_pretrained(ld.pipeline_location(bases.diffusers_dir(str(base))),
                                                         controlnet=ld.unwrap(controlnet))
    pipe.set_progress_bar_config(disable=True)
    return pipe
