"""SD3.x and Flux ControlNets on tiny stand-ins of their bases (the architectures' block types, text
encoders and VAE at a few channels, random weights): built from the base's transformer, exported,
and sampled the same by plain diffusers' ControlNet pipeline. Their training through model=controlnet
is tested in test_flow_controlnet_train.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxControlNetModel, SD3ControlNetModel

from genlab.families import flow_controlnet, stand_ins

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = {"sd3": (stand_ins.save_sd3, SD3ControlNetModel), "flux": (stand_ins.save_flux, FluxControlNetModel)}


@pytest.fixture(scope="module", params=sorted(KINDS))
def base(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, KINDS[request.param][0](root / "base", tokenizer_dir=str(root / "tok"))


def _images(pipe, sketch, scale=1.0):
    torch.manual_seed(0)  # SD3's pipeline samples the sketch's VAE latents from the global RNG
    return pipe("a red circle", control_image=sketch, controlnet_conditioning_scale=scale, height=32, width=32,
                num_inference_steps=2, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


def test_controlnet_built_from_the_base_exports_and_samples_the_same_in_plain_diffusers(base, tmp_path):
    kind, base_dir = base
    controlnet = flow_controlnet.build_controlnet(str(base_dir))
    transformer = flow_controlnet.pipeline(str(base_dir), controlnet).transformer
    assert isinstance(controlnet, KINDS[kind][1])
    # A copy of the base's first blocks, its output projections zero (the base unchanged at step 0).
    ours, theirs = controlnet.transformer_blocks[0].state_dict(), transformer.transformer_blocks[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(not p.any() for p in controlnet.controlnet_blocks.parameters())
    sketch = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # stands in for training: every weight moves
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pipe = flow_controlnet.pipeline(str(base_dir), controlnet)
    images = _images(pipe, sketch)
    assert (images - _images(pipe, sketch, scale=0.0)).abs().max() > 1e-3  # the ControlNet steers the image

    export = flow_controlnet.export(controlnet, tmp_path)
    plain = type(pipe).from_pretrained(base_dir, controlnet=KINDS[kind][1].from_pretrained(export))
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(images, _images(plain, sketch))

