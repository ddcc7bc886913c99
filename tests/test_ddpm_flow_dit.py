"""Pixel diffusion on the shared core: flow matching and the DiT backbone, through the family and the CLI.

Exports load in plain diffusers and give genlab's images for the same noise; runs train and
sample through `genlab train` / `genlab sample` (in-process, a few steps on 8 px digits).
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

from conftest import TINY_DDPM, cli
from genlab.errors import GenlabError
from genlab.families.ddpm import DDPM

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = dict(block_out_channels=[8, 8], down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4, attention_head_dim=8)
DIT = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, patch_size=2)
TINY_DIT = ["model.backbone=dit", "model.dit.num_layers=1", "model.dit.num_attention_heads=2",
            "model.dit.attention_head_dim=8"]


def perturbed(family: DDPM) -> DDPM:
    """Random non-zero weights everywhere (DiT zero-initialises its modulation: outputs would be 0)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in family.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return family.to(torch.device("cpu"))


@pytest.mark.parametrize("objective,sampler", [("epsilon", "ddpm"), ("flow", "euler")])
def test_unet_export_is_a_ddpm_pipeline_with_the_same_images(tmp_path, objective, sampler):
    family = perturbed(DDPM(8, 1, UNET, objective=objective, sampler=sampler))
    family.export(tmp_path / "export")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "export")
    pipe.set_progress_bar_config(disable=True)
    ours = (family.sample(3, seed=7, steps=5) + 1) / 2
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=5,
                  output_type="np").images
    assert torch.allclose(ours.permute(0, 2, 3, 1), torch.from_numpy(theirs), atol=1e-5)
    assert ours.std() > 0.01


def test_dit_export_loads_in_plain_diffusers_with_the_same_images(tmp_path):
    """The loading code of docs/guide/diffusion.md's "Loading a pixel DiT export" section, verbatim in spirit."""
    family = perturbed(DDPM(8, 1, num_classes=10, conditional=True, backbone="dit", dit=DIT, objective="flow",
                            guidance=2.0))
    family.export(tmp_path / "export")
    ours = (family.sample(4, seed=3, steps=4) + 1) / 2

    transformer = DiTTransformer2DModel.from_pretrained(tmp_path / "export" / "transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "export" / "scheduler")
    scheduler.set_timesteps(4)
    labels, null = torch.arange(4), torch.full((4,), 10)  # class 10 = "no class" (10 digit classes)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in scheduler.timesteps:
            both = transformer(torch.cat([x, x]), t.expand(8), class_labels=torch.cat([labels, null])).sample
            cond, uncond = both.chunk(2)
            x = scheduler.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
    assert torch.allclose(ours, (x.clamp(-1, 1) + 1) / 2, atol=1e-5)
    assert ours.std() > 0.01


@pytest.mark.parametrize("kw", [dict(objective="flow"), dict(backbone="dit", dit=DIT, sampler="ddim")])
def test_same_seed_same_images(kw):
    family = perturbed(DDPM(8, 1, UNET, **kw))
    a, b, c = family.sample(3, seed=0, steps=3), family.sample(3, seed=0, steps=3), family.sample(3, seed=1, steps=3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.mark.parametrize("name,overrides,sampler,wrong", [
    ("flow", ["model.objective=flow", "model.timesteps=logit_normal"], "heun", "ddim"),
    ("dit", [*TINY_DIT, "model.conditional=true"], "dpm", "euler"),
])
def test_train_and_sample_through_the_cli(tmp_path, name, overrides, sampler, wrong):
    run = tmp_path / name
    cli("train", *TINY_DDPM, *overrides, "trainer.sample_every=0", f"hydra.run.dir={run}")
    losses = _losses(run)
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)
    out = tmp_path / "grid.png"
    cli("sample", run, "--n", "4", "--sampler", sampler, "--steps", "3", "--out", out)
    assert out.stat().st_size > 100
    refused = cli("sample", run, "--n", "4", "--sampler", wrong, check=False)
    assert refused.returncode == 1 and f"--sampler {wrong}" in refused.stdout + refused.stderr


@pytest.mark.parametrize("kw", [dict(objective="flow", timesteps="logit_normal", weighting="cosmap"),
                                dict(backbone="dit", dit=DIT, objective="flow", timesteps="mode"),
                                dict(backbone="dit", dit=DIT, objective="v", weighting="min_snr", offset_noise=0.1)])
def test_two_processes_draw_what_one_process_draws(kw):
    """Every draw goes through StepRandom: 2 ranks x 4 images give the loss of 1 x 8 (DiT's own label
    dropout, drawn from torch's global RNG, would not)."""
    from genlab.step_random import StepRandom

    family = DDPM(8, 1, UNET, num_classes=10, conditional=True, cond_dropout=0.5, **kw)
    phase = family.phases(0)[0]
    batch = {"image": torch.rand(8, 1, 8, 8) * 2 - 1, "label": torch.arange(8)}
    whole = family.loss(phase, batch, 0, StepRandom(0, 0, phase, 0))[0]
    halves = [family.loss(phase, {k: v[4 * r:4 * r + 4] for k, v in batch.items()}, 0,
                          StepRandom(0, 0, phase, 0, rank=r, world_size=2))[0] for r in (0, 1)]
    assert torch.allclose(whole, (halves[0] + halves[1]) / 2, atol=1e-6)


def test_a_unet_whose_attention_gets_no_head_is_refused_when_built():
    """attention_head_dim wider than an attention layer's channels: 0 heads, a ZeroDivisionError at step 1 in diffusers."""
    unet = {"block_out_channels": [16, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "layers_per_block": 1}
    with pytest.raises(GenlabError, match="attention_head_dim=32 is wider than an attention layer of 16 channels"):
        DDPM(image_size=8, channels=1, unet={**unet, "attention_head_dim": 32})
    DDPM(image_size=8, channels=1, unet={**unet, "attention_head_dim": 16})  # one head of 16: trains
