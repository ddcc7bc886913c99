"""A ControlNet on a Sana base (a tiny stand-in: Sana's linear-attention transformer, DC-AE and a Gemma 2 text
encoder at a few channels): the checks of flow_kind_checks.py, and what is Sana's own."""

from __future__ import annotations

import pytest
from diffusers import SanaControlNetModel, SanaControlNetPipeline

import flow_kind_checks
from flow_kind_checks import *  # noqa: F403  (the shared tests, run on this file's SPEC)
from flow_kind_checks import KindSpec
from genlab.families.sana_controlnet import SanaControlNet

pytestmark = pytest.mark.usefixtures("one_thread")
# Sana's pipeline would bin 32 px up to its training resolutions; the plain pipeline keeps its own DPM-Solver.
SPEC = KindSpec(kind="sana", pipeline="SanaPipeline", controlnet=SanaControlNetModel,
                controlnet_pipeline=SanaControlNetPipeline, family=SanaControlNet,
                guidance=lambda g: {"guidance_scale": g, "use_resolution_binning": False}, packed=False,
                empty_as_negative=True)


def test_samples_with_the_base_dpm_solver_by_default_and_with_euler_on_request(trained):  # noqa: F811
    import torch

    from genlab.sample import load_family

    family, _ = load_family(trained, "latest")
    assert family.sampler_name == "dpm" and type(family.pipeline("dpm").scheduler).__name__ == "DPMSolverMultistepScheduler"
    dpm, euler = (family.sample(1, seed=3, steps=2, sampler=name) for name in ("dpm", "euler"))
    assert torch.isfinite(euler).all() and (dpm - euler).abs().max() > 1e-4  # another sampler, another image


# 13 s on 2 cores (Sana's stand-in at 2 micro-batches a step): Qwen-Image and Z-Image resume through the same
# code in the default suite, Sana in the slow one.
@pytest.mark.slow
def test_controlnet_resume_is_bitwise(request, tmp_path, base):  # noqa: F811
    flow_kind_checks.test_controlnet_resume_is_bitwise(request, tmp_path, base)
