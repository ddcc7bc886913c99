"""SD3.x and Flux ControlNets on tiny stand-ins of their bases (the architectures' block types, text
encoders and VAE at a few channels, random weights): built from the base's transformer, exported,
and sampled the same by plain diffusers' ControlNet pipeline. Their training through model=controlnet
is tested in test_flow_controlnet_train.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_up_to_rounding, flux_now_sd3_slow, other_cpu_capability
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


def _move_every_weight(controlnet):
    """Stands in for training: every weight moves, by a seeded amount."""
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return controlnet


SKETCH_SEED = 1


@flux_now_sd3_slow
def test_controlnet_built_from_the_base_exports_and_samples_the_same_in_plain_diffusers(base, tmp_path):
    kind, base_dir = base
    controlnet = flow_controlnet.build_controlnet(str(base_dir))
    transformer = flow_controlnet.pipeline(str(base_dir), controlnet).transformer
    assert isinstance(controlnet, KINDS[kind][1])
    # A copy of the base's first blocks, its output projections zero (the base unchanged at step 0).
    ours, theirs = controlnet.transformer_blocks[0].state_dict(), transformer.transformer_blocks[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(not p.any() for p in controlnet.controlnet_blocks.parameters())
    sketch = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(SKETCH_SEED))
    _move_every_weight(controlnet)
    pipe = flow_controlnet.pipeline(str(base_dir), controlnet)
    images = _images(pipe, sketch)
    assert (images - _images(pipe, sketch, scale=0.0)).abs().max() > 1e-3  # the ControlNet steers the image

    export = flow_controlnet.export(controlnet, tmp_path)
    plain = type(pipe).from_pretrained(base_dir, controlnet=KINDS[kind][1].from_pretrained(export))
    plain.set_progress_bar_config(disable=True)
    # Another object graph (a pipeline loaded from the export): the same result up to float rounding.
    assert_same_up_to_rounding(images, _images(plain, sketch))


# The export loaded by plain diffusers in a process that computes like another CPU (its own
# vectorised kernels), as a user's machine would: the images differ in their last bits here (by
# 4.8e-7 on this test's Flux stand-in on a Xeon), so this fails if the comparison is made bitwise.
PLAIN_SAMPLE = """
import torch
from diffusers import {pipeline}, {controlnet}
from test_flow_controlnet import _images
torch.set_num_threads(1)
pipe = {pipeline}.from_pretrained({base!r}, controlnet={controlnet}.from_pretrained({export!r}))
pipe.set_progress_bar_config(disable=True)
sketch = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed({seed}))
torch.save(_images(pipe, sketch), {out!r})
"""


@flux_now_sd3_slow
def test_the_export_samples_the_same_on_another_cpu(base, tmp_path):
    kind, base_dir = base
    controlnet = _move_every_weight(flow_controlnet.build_controlnet(str(base_dir)))
    pipe = flow_controlnet.pipeline(str(base_dir), controlnet)
    sketch = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(SKETCH_SEED))
    ours = _images(pipe, sketch)
    export = flow_controlnet.export(controlnet, tmp_path)
    code = PLAIN_SAMPLE.format(pipeline=type(pipe).__name__, controlnet=KINDS[kind][1].__name__,
                               base=str(base_dir), export=str(export),
                               seed=SKETCH_SEED, out=str(tmp_path / "plain.pt"))
    env = {**os.environ, **other_cpu_capability(), "PYTHONPATH": str(Path(__file__).parent)}  # the code imports _images from here
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_up_to_rounding(ours, torch.load(tmp_path / "plain.pt"))

