"""Rectified flow on the latent U-Net path (model=sd, model=controlnet on a flow base) and model=sd on the MMDiT."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from conftest import assert_same_png_pixels, assert_same_up_to_rounding, cli, compose, rng
from genlab.config import build
from genlab.data.fill_circles import FillCircles
from genlab.errors import ConfigError
from genlab.families import latent_diffusion as ld
from genlab.families import sd as sd_module
from genlab.families.sd import StableDiffusion
from genlab.families.sd3 import StableDiffusion3
from genlab.run_dir import load_family
from genlab.train.sampling import save_grid
from test_resume_exact import _assert_resume_is_bitwise
from test_resume_sd import CIRCLES, COMMON, TINY_UNET, cn_config, train, vae_run  # noqa: F401 (vae_run: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
GUIDE = Path(__file__).parents[1] / "docs" / "guide" / "text-to-image.md"  # the user guide page with the loading code
PROMPT = "a red circle on a blue background"


def flow_config(vae, tok, steps, *extra):
    return compose("model=sd", "model.objective=flow", f"model.vae={vae}", f"model.tokenizer_dir={tok}", *TINY_UNET,
                   *COMMON, *CIRCLES, f"trainer.max_steps={steps}", *extra)


def guide_loading_code() -> str:
    """The user guide's loading code for a flow SD export, as the user copies it."""
    section = GUIDE.read_text().split("## Loading a flow SD export", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def guide_pipeline(export: Path) -> StableDiffusionPipeline:
    namespace: dict = {}
    exec(guide_loading_code().replace("RUN/export", str(export)), namespace)
    return namespace["pipe"]


def guide_adapter(pipe):
    """Only the guide's `pipe.scheduler...` lines, run on another pipeline (a ControlNet one)."""
    lines = [line for line in guide_loading_code().splitlines() if line.startswith("pipe.scheduler.")]
    exec("\n".join(lines), {"pipe": pipe})
    return pipe


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, vae_run):
    """`genlab train model=sd model.objective=flow` for 2 steps through the CLI on the tiny circles chain."""
    run = tmp_path_factory.mktemp("flow") / "run"
    tok = tmp_path_factory.mktemp("tok")
    cli("train", "model=sd", "model.objective=flow", f"model.vae={vae_run}", f"model.tokenizer_dir={tok}", *TINY_UNET,
        *COMMON, *CIRCLES, "trainer.max_steps=2", f"hydra.run.dir={run}")
    return run


def test_flow_sd_trains_through_the_cli_and_exports_a_plain_flow_scheduler(flow_run):
    losses = [json.loads(line)["loss"] for line in (flow_run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    index = json.loads((flow_run / "export" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]  # diffusers' own class
    assert (flow_run / "samples" / "final.png").exists()  # the loop's final grid went through the U-Net pipeline
    assert "pipe.scheduler.init_noise_sigma = 1.0" in (flow_run / "export" / "README.md").read_text()  # the model card


def test_flow_target_is_the_velocity(flow_run, monkeypatch):
    """A U-Net that knows x0 and predicts noise - x0 exactly has zero loss; its negation does not."""
    family, _ = load_family(flow_run)
    seen = {}

    def spy(*args):  # the clean latents x0 the family drew this step
        seen["x0"] = ld_latents(*args)
        return seen["x0"]

    ld_latents = sd_module.cached_or_encoded_latents
    monkeypatch.setattr(sd_module, "cached_or_encoded_latents", spy)

    def velocity(sign):
        def unet(x_t, t, encoder_hidden_states):
            s = (t / 1000).view(-1, 1, 1, 1)  # x_t = (1 - s) x0 + s noise  =>  noise - x0 = (x_t - x0) / s
            return SimpleNamespace(sample=sign * (x_t - seen["x0"]) / s)
        return unet

    data = FillCircles("train", image_size=32, count=8)
    batch = default_collate([data[i] for i in range(4)])
    family.unet = velocity(1)
    exact, _ = family.loss("main", batch, 0, rng(0))
    family.unet = velocity(-1)
    flipped, _ = family.loss("main", batch, 0, rng(0))
    assert exact < 1e-8 and flipped > 0.5


def test_guide_loading_code_gives_genlabs_samples(flow_run, tmp_path):
    """`genlab sample` and plain diffusers with the guide's three lines: the same images for the same seed
    (up to float rounding: two code paths)."""
    cli("sample", flow_run, "--n", "2", "--seed", "5", "--steps", "3", "--prompt", PROMPT, "--out", tmp_path / "genlab.png")
    pipe = guide_pipeline(flow_run / "export")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe([PROMPT] * 2, height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                  generator=ld.generators(2, 5), output_type="pt").images * 2 - 1
    save_grid(theirs, tmp_path / "diffusers.png")
    assert_same_png_pixels(tmp_path / "genlab.png", tmp_path / "diffusers.png")  # two code paths: up to rounding
    family, _ = load_family(flow_run)
    ours = family.sample(2, 5, prompt=PROMPT, steps=3)
    assert_same_up_to_rounding(ours, theirs)
    assert theirs.std() > 0.01
    heun = family.sample(2, 5, prompt=PROMPT, steps=3, sampler="heun")
    assert torch.isfinite(heun).all() and not torch.allclose(heun, ours)


@pytest.fixture(scope="module")
def flow_cn_run(tmp_path_factory, flow_run):
    """A ControlNet + base LoRA trained 2 steps on the flow SD base."""
    run = tmp_path_factory.mktemp("cn") / "run"
    train(cn_config(flow_run, 2, "trainer.lr=0.05"), run)  # big steps: the zero convolutions move visibly
    return run


def test_controlnet_on_a_flow_base_trains_flow_and_its_export_matches_in_plain_diffusers(flow_cn_run, flow_run):
    family, _ = load_family(flow_cn_run)
    assert family.diffusion.objective == "flow"  # read from the base's saved FlowMatchEulerDiscreteScheduler
    losses = [json.loads(line)["loss"] for line in (flow_cn_run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    val = FillCircles("val", count=64, val_count=8)
    sketches, prompts = torch.stack([val[i]["sketch"] for i in range(2)]), [val[i]["caption"] for i in range(2)]
    ours = family.sample(2, 3, sketch=sketches, prompt=prompts, steps=3)
    off = family.sample(2, 3, sketch=sketches, prompt=prompts, steps=3, control_scale=0.0)
    assert torch.isfinite(ours).all() and not torch.allclose(ours, off, atol=1e-3)  # the ControlNet steers

    export = flow_cn_run / "export"
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        flow_run / "export", controlnet=ControlNetModel.from_pretrained(export / "controlnet"), safety_checker=None)
    guide_adapter(pipe).load_lora_weights(export)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, image=sketches, height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                  generator=ld.generators(2, 3), output_type="pt").images * 2 - 1
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_flow_sd_resume_is_bitwise(tmp_path, vae_run):
    """2N steps straight == N steps, then resumed to 2N (SD3's logit-normal noise levels, caption dropout, EMA)."""
    tok = tmp_path / "tok"

    def cfg_for(steps):
        return flow_config(vae_run, tok, steps, "model.timesteps=logit_normal", "trainer.grad_accum=2",
                           "trainer.checkpoint_every=2", "model.caption_dropout=0.5")

    _assert_resume_is_bitwise(tmp_path, cfg_for, 2)


def test_sd_on_the_mmdit_backbone_trains_and_samples(tmp_path, vae_run):
    cfg = compose("model=sd", "model.backbone=mmdit", f"model.vae={vae_run}", f"model.tokenizer_dir={tmp_path / 'tok'}",
                  "model.text_encoder.hidden_size=32", *COMMON, *CIRCLES, "trainer.max_steps=2")
    run = tmp_path / "run"
    train(cfg, run)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    family, _ = load_family(run)
    assert isinstance(family, StableDiffusion3) and family.diffusion.objective == "flow"  # null: the MMDiT's own
    assert json.loads((run / "export" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert torch.isfinite(family.sample(1, 0, steps=2)).all()


def test_backbone_keys_say_what_to_fix_and_old_configs_still_load(tmp_path, vae_run):
    def model(*overrides):
        return compose("model=sd", f"model.vae={vae_run}", f"model.tokenizer_dir={tmp_path / 'tok'}", *TINY_UNET,
                       *CIRCLES, *overrides).model

    with pytest.raises(ConfigError, match="model.backbone=mmdit trains a tiny MMDiT"):
        build("model", model("model.backbone=mmdit", "model.gradient_checkpointing=true"))
    with pytest.raises(ConfigError, match="use unet or mmdit"):
        build("model", model("model.backbone=dit"))
    # A run saved before model.backbone: its config targets the class, with objective written out.
    old = OmegaConf.to_container(model(), resolve=True)
    for key in ("backbone", "mmdit", "shift"):
        del old[key]
    old.update({"_target_": "genlab.families.sd.StableDiffusion", "objective": "epsilon"})
    family = build("model", OmegaConf.create(old))
    assert isinstance(family, StableDiffusion) and family.diffusion.objective == "epsilon"
    assert build("model", model()).diffusion.objective == "epsilon"  # null: the U-Net's own
