"""The SDXL union ControlNet: diffusers' `ControlNetUnionModel` (xinsir's ControlNet++), several control types in one model.

A union ControlNet is a ControlNet copy of the base U-Net's encoder plus what tells the control types
apart: a learned embedding per control-type slot (`task_embedding`, `num_control_type` of them, 6 for
`from_unet`), a one-hot of the slots in use added to the time embedding (`control_type` through
`control_add_embedding`), and a small transformer that fuses the control images' features
(`transformer_layes`, `spatial_ch_projs`). `StableDiffusionXLControlNetUnionPipeline` takes the images
as `control_image` and their slots as `control_mode`. The slots of xinsir's published union models:
0 openpose, 1 depth, 2 hed / pidi / scribble / ted, 3 canny / lineart / anime lineart / mlsd,
4 normal, 5 segment (promax adds 6 tile, 7 repaint).

`model.controlnet.control_modes` maps each control genlab trains on to its slot:
- `sketch`: the data's sketch (its `sketch` item);
- `edges`: Canny edges of the data's image (`data.sketches.edges_of_image`, the edges
  `genlab sample --edges-from` makes).
With several, each sample of a micro-batch draws one of them from the step's random stream, so a
resumed run draws what the straight run did. A sample's slot goes in as a per-sample index
(`control_type_idx=[LongTensor (B,)]`, which indexes `task_embedding` per sample) beside its one-hot
`control_type` row; a batch of one slot is exactly the pipeline's call (`tests/test_controlnet_union.py`).

The union's fusing transformer is `nn.MultiheadAttention` fed (B, tokens, C) without `batch_first`, so it
attends across the batch: a sample's residuals depend on the other samples of its batch (and, in the
pipeline, on its classifier-free-guidance twin). That is diffusers' model as published, in training as
in sampling; genlab keeps it, so n images drawn at once differ from n drawn one by one, in genlab as in
plain diffusers, and a micro-batch split over processes trains slightly differently from one process.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import ControlNetUnionModel, UNet2DConditionModel

from genlab.errors import ConfigError, GenlabError

#: The controls genlab can give a union ControlNet, and where each comes from (see the module docstring).
CONTROLS = {"sketch": "the data's sketch", "edges": "Canny edges of the data's image"}
#: model.controlnet.control_modes=null: the data's sketch in xinsir's hed / pidi / scribble / ted slot.
DEFAULT_MODES = {"sketch": 2}


def control_modes(cfg: Mapping[str, Any]) -> dict[str, int]:
    """`model.controlnet.control_modes` checked: {control name: slot}, in the config's order (the first is
    what `genlab sample --sketch` takes by default); null: `DEFAULT_MODES`."""
    modes = cfg.get("control_modes")
    if modes is None:
        return dict(DEFAULT_MODES)
    if not isinstance(modes, Mapping) or not modes:
        raise ConfigError(f"model.controlnet.control_modes={modes!r}: give each control its union slot, "
                          "e.g. model.controlnet.control_modes={sketch:2} or {sketch:2,edges:3}.")
    unknown = sorted(set(modes) - set(CONTROLS))
    if unknown:
        raise ConfigError(f"model.controlnet.control_modes: unknown control(s) {unknown}; the union trains on "
                          f"{', '.join(f'{k} ({v})' for k, v in CONTROLS.items())}.")
    out = {}
    for name, slot in modes.items():
        if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
            raise ConfigError(f"model.controlnet.control_modes.{name}={slot!r}: a slot is an integer >= 0.")
        out[str(name)] = slot
    return out


def check_slots(modes: Mapping[str, int], controlnet: ControlNetUnionModel) -> None:
    """Every configured slot exists in this union model (`num_control_type` of them)."""
    n = controlnet.config.num_control_type
    bad = {k: v for k, v in modes.items() if v >= n}
    if bad:
        raise ConfigError(f"model.controlnet.control_modes={dict(modes)}: this union ControlNet has {n} control "
                          f"slots (0-{n - 1}), so {bad} does not exist.")


def from_unet(unet: UNet2DConditionModel, hint: tuple[int, ...]) -> ControlNetUnionModel:
    """A union ControlNet that starts as a copy of the base U-Net's encoder.

    diffusers' `ControlNetUnionModel.from_unet` copies conv_in, the time and class embeddings and the down and
    mid blocks, but not SDXL's `add_embedding` (the pooled prompt and time ids), which
    `ControlNetModel.from_unet` copies: left random, the copy would read the prompt and size differently
    from the base from step 0. It is copied here.
    """
    controlnet = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=hint)
    width = unet.config.block_out_channels[0]
    if controlnet.config.num_trans_channel != width:
        # from_unet keeps the fusing transformer at SDXL's 320 channels whatever the U-Net's first block (a
        # smaller one, a tiny stand-in, would not run): the same model with it sized to the U-Net, the copied
        # weights moved over (the union's own parts are new either way).
        config = {k: v for k, v in controlnet.config.items() if not k.startswith("_")}  # _use_default_values too
        sized = ControlNetUnionModel.from_config({**config, "num_trans_channel": width, "num_proj_channel": width,
                                                  "num_trans_head": 8 if width % 8 == 0 else 1})
        new = {"task_embedding", "transformer_layes", "spatial_ch_projs"}
        sized.load_state_dict({k: v for k, v in controlnet.state_dict().items() if k.split(".")[0] not in new},
                              strict=False)
        controlnet = sized
    if getattr(unet, "add_embedding", None) is not None and getattr(controlnet, "add_embedding", None) is not None:
        controlnet.add_embedding.load_state_dict(unet.add_embedding.state_dict())
    return controlnet


def control_images(names: list[str], batch: Mapping[str, Any]) -> torch.Tensor:
    """Each sample's control image, (B, 3, H, W) in [0, 1]: its sketch, or the edges of its image."""
    from genlab.data.sketches import edges_of_image

    sketch = batch["sketch"]
    if "edges" not in names:
        return sketch
    image = batch["image"]  # (B, 3, H, W) in [-1, 1]
    rows = [edges_of_image(((image[i].detach().float().cpu() + 1) / 2)).to(sketch.device, sketch.dtype)
            if name == "edges" else sketch[i] for i, name in enumerate(names)]
    return torch.stack(rows)


def training_controls(batch: Mapping[str, Any], modes: Mapping[str, int], rng: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch's control images (B, 3, H, W) and their slots (B,): one configured control per sample,
    drawn from `rng` when there are several (no draw for one)."""
    names = list(modes)
    n = len(batch["sketch"])
    which = rng.randint(len(names), n).tolist() if len(names) > 1 else [0] * n
    picked = [names[i] for i in which]
    slots = torch.tensor([modes[name] for name in picked], device=batch["sketch"].device)
    return control_images(picked, batch), slots


def union_inputs(images: torch.Tensor, slots: torch.Tensor, num_control_type: int, dtype: torch.dtype) -> dict:
    """The union ControlNet's control keywords for one control image per sample.

    `control_type` (B, num_control_type) is each sample's one-hot, as the pipeline makes it for one
    `control_mode`; `control_type_idx=[slots]` indexes `task_embedding` per sample.
    """
    one_hot = torch.zeros(len(slots), num_control_type, device=images.device, dtype=dtype)
    one_hot.scatter_(1, slots.to(images.device)[:, None], 1)
    return {"controlnet_cond": [images], "control_type": one_hot, "control_type_idx": [slots.to(images.device)]}


def sample_slot(control_mode: Any, modes: Mapping[str, int], num_control_type: int) -> tuple[str | None, int]:
    """`sample`'s `control_mode` (None: the first configured control; a control's name; or a slot number)
    as (the control's name, or None for a slot no control was trained under; its slot)."""
    if control_mode is None:
        name = next(iter(modes))
        return name, modes[name]
    if isinstance(control_mode, str) and not control_mode.lstrip("-").isdigit():
        if control_mode not in modes:
            raise GenlabError(f"--control-mode {control_mode}: this run trained {dict(modes)}; give one of "
                              f"{sorted(modes)} or a slot number.")
        return control_mode, modes[control_mode]
    slot = int(control_mode)
    if not 0 <= slot < num_control_type:
        raise GenlabError(f"--control-mode {slot}: this union ControlNet has slots 0-{num_control_type - 1} "
                          f"(trained: {dict(modes)}).")
    named = [k for k, v in modes.items() if v == slot]
    return (named[0] if named else None), slot
