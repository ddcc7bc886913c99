"""Z-Image's ControlNet as genlab builds and holds it (`ZImageControlNetModel`).

Z-Image's ControlNet has no copy of the base's embedders and refiners: diffusers' `from_transformer`
makes it *share* them (`SHARED`), and its pipeline does that when it is built. Held shared, the
ControlNet's parameters would include frozen base weights (trained, checkpointed and exported with
it), so genlab keeps it apart and shares only for the length of each call (`share_on_call`); its
state dict, checkpoints and export are then the ControlNet's own weights, which is what the pipeline
loads.
"""

from __future__ import annotations

import torch
from torch import nn

# The attributes `ZImageControlNetModel.from_transformer` sets to the transformer's own modules and tokens.
SHARED = ("t_embedder", "all_x_embedder", "cap_embedder", "rope_embedder", "noise_refiner", "context_refiner",
          "x_pad_token", "cap_pad_token")
#: One control block every this many base blocks, starting at the first (Z-Image-Turbo-Fun-Controlnet-Union's 6 of 30).
EVERY = 5


def controlnet_for(transformer: nn.Module, num_layers: int | None = None) -> nn.Module:
    """A Z-Image ControlNet of `num_layers` control blocks (None: one per EVERY base blocks), spread evenly over
    the base's blocks, each a copy of the base block it feeds (its projections in and out zero)."""
    from diffusers import ZImageControlNetModel

    config = transformer.config
    n = config.n_layers
    count = min(num_layers or -(-n // EVERY), n)
    places = [i * n // count for i in range(count)]
    controlnet = ZImageControlNetModel(
        control_layers_places=places, control_in_dim=config.in_channels, all_patch_size=config.all_patch_size,
        all_f_patch_size=config.all_f_patch_size, dim=config.dim, n_refiner_layers=config.n_refiner_layers,
        n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, norm_eps=config.norm_eps, qk_norm=config.qk_norm)
    for block, place in zip(controlnet.control_layers, places):
        block.load_state_dict(transformer.layers[place].state_dict(), strict=False)  # before/after_proj stay zero
    return controlnet


def unshare(controlnet: nn.Module) -> None:
    """Drop the base's modules from the ControlNet (they stay the transformer's)."""
    for name in SHARED:
        setattr(controlnet, name, None)


def share_on_call(controlnet: nn.Module, transformer: nn.Module) -> None:
    """Make every call of `controlnet` (genlab's or a pipeline's) see `transformer`'s modules, and only the call."""
    from diffusers import ZImageControlNetModel

    unshare(controlnet)
    # diffusers' ZImageControlNetModel reads this flag with gradients on but sets it only in enable_...().
    controlnet.gradient_checkpointing = getattr(controlnet, "gradient_checkpointing", False)

    def share(module, args, kwargs):
        ZImageControlNetModel.from_transformer(module, transformer)

    def drop(module, args, kwargs, output):
        unshare(module)

    controlnet.register_forward_pre_hook(share, with_kwargs=True)
    controlnet.register_forward_hook(drop, with_kwargs=True, always_call=True)


def velocity(controlnet: nn.Module | None, transformer: nn.Module, noisy: torch.Tensor, t: torch.Tensor,
             cap_feats: list[torch.Tensor], control: torch.Tensor | None) -> torch.Tensor:
    """The velocity noise - x0 (B, c, h, w) as `ZImageControlNetPipeline` computes it: one-frame latents as a list,
    the timestep as 1 - sigma, and the transformer's output negated (Z-Image predicts x0 - noise). With no
    `controlnet` (None), the base's own, as `ZImagePipeline` computes it."""
    x = list(noisy.unsqueeze(2).unbind(0))
    timestep = (1000 - t) / 1000
    blocks = None if controlnet is None else controlnet(x, timestep, cap_feats, control.unsqueeze(2))
    out = transformer(x, timestep, cap_feats, controlnet_block_samples=blocks, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)
