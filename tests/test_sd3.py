"""SD3-style text-to-image (model=sd3): an MMDiT trained by rectified flow, exported as a StableDiffusion3Pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from torch.utils.data import default_collate

from conftest import rng
from genlab.data.fill_circles import FillCircles
from genlab.errors import ConfigError
from genlab.families import latent_diffusion as ld
from genlab.families.sd3 import StableDiffusion3

pytestmark = pytest.mark.usefixtures("one_thread")
MMDIT = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, caption_projection_dim=32, patch_size=2)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """An AutoencoderKL (4x down, 4 latent channels) as a genlab VAE run would export it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1, sample_size=32, scaling_factor=0.5).save_pretrained(path)
    return str(path)


def test_sd3_trains_and_exports_a_pipeline_with_the_same_images(vae_dir, tmp_path):
    torch.manual_seed(0)
    family = StableDiffusion3(32, vae=vae_dir, tokenizer_dir=str(tmp_path / "tok"), mmdit=MMDIT,
                              text_encoder=dict(hidden_size=32, num_layers=1), caption_dropout=0.0,
                              sample_steps=3, guidance=3.0).to(torch.device("cpu"))
    data = FillCircles("train", image_size=32, count=16)
    batch = default_collate([data[i] for i in range(4)])
    params = [p for group in family.param_groups()["main"] for p in group["params"]]
    opt = torch.optim.AdamW(params, lr=2e-3)
    pooled_head = family.text_encoder_2.text_projection.weight.detach().clone()
    losses = []
    for step in range(6):
        loss, logs = family.loss("main", batch, step, rng(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(logs["loss"].item())
    assert all(0 < x < 10 for x in losses) and min(losses[3:]) < losses[0]
    # The text encoders train with the MMDiT (the loss reaches them through the pipeline's encode_prompt).
    assert not torch.equal(pooled_head, family.text_encoder_2.text_projection.weight)

    ours = family.sample(2, seed=5, prompt="a red circle")
    assert torch.equal(ours, family.sample(2, seed=5, prompt="a red circle"))
    assert not torch.equal(ours, family.sample(2, seed=6, prompt="a red circle"))
    family.export(tmp_path / "export")
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "export", text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(["a red circle"] * 2, height=32, width=32, num_inference_steps=3, guidance_scale=3.0,
                  max_sequence_length=1, generator=ld.generators(2, 5), output_type="pt").images * 2 - 1
    assert torch.allclose(ours, theirs, atol=1e-5) and ours.std() > 0.05


def test_sd3_trains_flow_only(vae_dir, tmp_path):
    with pytest.raises(ConfigError, match="sd3 trains flow"):
        StableDiffusion3(32, vae=vae_dir, tokenizer_dir=str(tmp_path / "tok"), mmdit=MMDIT, objective="v")
    with pytest.raises(ConfigError, match="model.vae"):
        StableDiffusion3(32, vae=None)


@pytest.mark.slow  # ~20 s: the loop's path for sd3 (the family itself is covered above)
def test_sd3_trains_samples_and_exports_through_the_cli(vae_dir, tmp_path):
    """The loop with three networks, EMA of the MMDiT, checkpoints, grids and the export."""
    from conftest import cli

    run = tmp_path / "run"
    cli("train", "model=sd3", f"model.vae={vae_dir}", f"model.tokenizer_dir={tmp_path / 'tok'}", "data=fill_circles",
        "data.count=16", "data.val_count=4", "trainer=debug", "logger=none", "trainer.max_steps=2",
        "trainer.checkpoint_every=2", "trainer.sample_every=2", "model.mmdit.num_layers=1", "model.sample_steps=2",
        "model.text_encoder.num_layers=1", f"hydra.run.dir={run}")
    assert (run / "export" / "transformer" / "config.json").exists()
    out = tmp_path / "grid.png"
    cli("sample", run, "--n", "2", "--sampler", "heun", "--steps", "2", "--prompt", "a red circle", "--out", out)
    assert out.stat().st_size > 100
    refused = cli("sample", run, "--n", "2", "--sampler", "unipc", check=False)
    assert refused.returncode == 1 and "euler, heun" in refused.stdout + refused.stderr
