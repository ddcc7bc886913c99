"""A ControlNet on a Z-Image base (a tiny stand-in: Z-Image's single-stream transformer, Flux's VAE and a Qwen3
text encoder at a few channels): the checks of flow_kind_checks.py, and what is Z-Image's own."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImageControlNetModel, ZImageControlNetPipeline

from flow_kind_checks import *  # noqa: F403  (the shared tests, run on this file's SPEC)
from flow_kind_checks import KindSpec
from genlab.families import flow_controlnet, z_image_parts
from genlab.families.z_image_controlnet import ZImageControlNet

pytestmark = pytest.mark.usefixtures("one_thread")
# Z-Image's CFG is pos + g (pos - neg): genlab's classic scale w is its g = w - 1 (0 = off).
SPEC = KindSpec(kind="z-image", pipeline="ZImagePipeline", controlnet=ZImageControlNetModel,
                controlnet_pipeline=ZImageControlNetPipeline, family=ZImageControlNet,
                guidance=lambda g: {"guidance_scale": g - 1}, packed=False, zero_out="after_proj")


def test_the_controlnet_holds_only_its_own_weights_and_copies_the_blocks_it_feeds(base):  # noqa: F811
    """The base's embedders and refiners are shared for each call only: never in the ControlNet's state (so
    neither trained, checkpointed nor exported with it); its control blocks start as copies of the base's."""
    controlnet = flow_controlnet.build_controlnet(str(base))
    pipe = flow_controlnet.pipeline(str(base), controlnet)
    z_image_parts.share_on_call(controlnet, pipe.transformer)  # what ZImageControlNet does after the pipeline
    keys = controlnet.state_dict().keys()
    assert not any(k.split(".")[0] in z_image_parts.SHARED for k in keys)
    places = controlnet.config.control_layers_places
    assert places[0] == 0
    ours, theirs = controlnet.control_layers[0].state_dict(), pipe.transformer.layers[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not controlnet.control_layers[0].after_proj.weight.any()  # zero out: the base unchanged at step 0
    image = pipe("a", control_image=torch.zeros(1, 3, 32, 32), height=32, width=32, num_inference_steps=1,
                 guidance_scale=0.0, max_sequence_length=32, output_type="latent").images
    assert torch.isfinite(image).all() and controlnet.t_embedder is None  # shared for the call, then dropped


def test_checkpoints_and_exports_hold_the_controlnet_alone(trained):  # noqa: F811
    from safetensors.torch import load_file

    from genlab.train.checkpoint import complete_checkpoints

    saved = [*load_file(complete_checkpoints(trained / "checkpoints")[-1] / "controlnet.safetensors"),
             *load_file(trained / "export" / "controlnet" / "diffusion_pytorch_model.safetensors")]
    assert saved and not [k for k in saved if k.split(".")[0] in z_image_parts.SHARED]


def test_the_sketch_enters_as_the_latents_mode_the_pipeline_hands_its_controlnet(trained):  # noqa: F811
    """The pipeline encodes the control image with sample_mode="argmax": training must not draw a posterior
    sample for it (no monkeypatched VAE here: a sample would differ)."""
    from conftest import rng
    from flow_kind_checks import _pipeline_control

    from genlab.sample import load_family

    family, _ = load_family(trained, "latest")
    sketch = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = family.control_latents(sketch, rng(0))
    theirs = _pipeline_control(family.pipeline("euler"), sketch * 2 - 1, family.text_tokens, SPEC)
    assert torch.allclose(ours, theirs.squeeze(2), atol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(base):  # noqa: F811
    """trainer.gradient_checkpointing=true (the memory presets) recomputes the ControlNet's blocks and the base's
    in the backward, through the base modules it shares only for each call: the same numbers as keeping them."""
    from torch.utils.data import default_collate

    from conftest import rng
    from genlab.data.fill_circles import FillCircles
    from genlab.families.controlnet import ControlNet

    data = FillCircles("train", image_size=32, count=4)
    batch = default_collate([data[i] for i in range(2)])
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        family = ControlNet(32, base=str(base), lora=dict(rank=0), gradient_checkpointing=checkpointing)
        family.to(torch.device("cpu"), torch.float32)
        assert family.controlnet.is_gradient_checkpointing == checkpointing
        loss, _ = family.loss("main", batch, 0, rng(0))
        loss.backward()
        runs[checkpointing] = (loss.detach(), [p.grad for p in family.controlnet.parameters() if p.grad is not None])
    assert torch.equal(runs[False][0], runs[True][0]) and len(runs[True][1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(runs[False][1], runs[True][1]))
