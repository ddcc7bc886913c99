"""The keys of `configs/model/controlnet.yaml`, read once for both ControlNet classes.

`genlab.families.controlnet.ControlNet` (the builder the config names) takes them, picks the class
by the base's kind (`UNetControlNet` for SD 1.x/2.x and SDXL, `FlowControlNet` for SD3.x and Flux)
and hands it one `ControlNetOptions`, so the keyword list and its defaults are written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from genlab.families.latent_diffusion import plain


@dataclass(frozen=True)
class ControlNetOptions:
    """configs/model/controlnet.yaml's keys as typed values (Hydra's DictConfigs made plain dicts).

    Args: see `genlab.families.controlnet.ControlNet`.
    """

    image_size: int
    channels: int = 3
    base: str = ""
    base_config: str | None = None
    vae: str | None = None
    controlnet: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)
    control_lora: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False
    quantize_base: str | None = None
    offload_base: str | None = None
    caption_dropout: float = 0.1
    sampler: str | None = None
    sample_steps: int = 25
    guidance: float = 5.0
    control_scale: float = 1.0
    validation_data: Any = None
    max_sequence_length: int | None = None
    #: the diffusion core's training keys (`genlab.diffusion.Diffusion.build`)
    diffusion: dict = field(default_factory=dict)

    @classmethod
    def read(cls, image_size: int, channels: int, base: str, keys: dict[str, Any]) -> "ControlNetOptions":
        """The options from the builder's keywords: the adapter groups as plain dicts ({} for null), and
        every key that is not an option as the diffusion core's."""
        names = {f.name for f in fields(cls)} - {"image_size", "channels", "base", "diffusion"}
        own = {k: v for k, v in keys.items() if k in names}
        for group in ("controlnet", "lora", "control_lora"):
            own[group] = plain(own.get(group)) or {}
        own["vae"] = plain(own.get("vae"))
        diffusion = {k: v for k, v in keys.items() if k not in names}
        return cls(image_size=image_size, channels=channels, base=str(base), diffusion=diffusion, **own)
