"""A ControlNet on a Qwen-Image base (a tiny stand-in: Qwen-Image's transformer, Wan VAE and Qwen2.5-VL text
encoder at a few channels): the checks of flow_kind_checks.py, and what is Qwen-Image's own."""

from __future__ import annotations

import pytest
from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline

from flow_kind_checks import *  # noqa: F403  (the shared tests, run on this file's SPEC)
from flow_kind_checks import KindSpec
from genlab.families.qwen_image_controlnet import QwenImageControlNet

pytestmark = pytest.mark.usefixtures("one_thread")
# Qwen-Image's CFG is the pipeline's true_cfg_scale against a negative prompt (no guidance embedding).
SPEC = KindSpec(kind="qwen-image", pipeline="QwenImagePipeline", controlnet=QwenImageControlNetModel,
                controlnet_pipeline=QwenImageControlNetPipeline, family=QwenImageControlNet,
                guidance=lambda g: {"true_cfg_scale": g, "negative_prompt": "" if g > 1 else None}, packed=True)
