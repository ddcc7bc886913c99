"""REPA (families/repa.py): the alignment term changes the loss it should and nothing else.

Off (weight 0) is today's run bit for bit; on, the diffusion loss is unchanged and the term only
reaches the layers up to the aligned one; resume stays bitwise; the projector is checkpointed and
left out of the export; a DINOv2 from a local folder works as the encoder.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, compose, rng
from genlab.config import build

DIT = ["model=ddpm", "trainer=debug", "logger=none", "data.image_size=8", "model.conditional=true",
       "model.backbone=dit", "model.dit.num_layers=2", "model.dit.num_attention_heads=2",
       "model.dit.attention_head_dim=8", "model.sample_steps=2", "model.objective=flow", "trainer.sample_every=0"]
UNET = ["model=ddpm", "trainer=debug", "logger=none", "data.image_size=8", "model.unet.block_out_channels=[8,8]",
        "model.unet.down_block_types=[DownBlock2D,DownBlock2D]", "model.unet.up_block_types=[UpBlock2D,UpBlock2D]",
        "model.unet.norm_num_groups=4", "model.unet.attention_head_dim=8", "model.sample_steps=2",
        "trainer.sample_every=0"]
ON = ["model.repa.encoder=digits_cnn", "model.repa.weight=0.5", "model.repa.projector_dim=16"]
BATCH = {"image": torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8), "label": torch.tensor([0, 1, 2, 3])}


def _family(*overrides):
    torch.manual_seed(0)
    return build("model", compose(*overrides).model)


@pytest.mark.parametrize("net,layer", [(DIT, 1), (UNET, 2)])
def test_the_diffusion_loss_is_unchanged_and_the_term_is_added_with_its_weight(net, layer, one_thread):
    plain, _ = _family(*net).loss("main", BATCH, 0, rng())
    family = _family(*net, *ON, f"model.repa.layer={layer}")
    total, logs = family.loss("main", BATCH, 0, rng())
    assert torch.equal(logs["diffusion_loss"], plain.detach())
    assert 0 < logs["repa_loss"] < 2  # 1 - a cosine
    assert torch.equal(total.detach(), plain.detach() + 0.5 * logs["repa_loss"])
    assert set(family.networks()) == {family.ema_network, "repa_projector"}


def test_the_term_reaches_only_the_layers_up_to_the_aligned_one(one_thread):
    family = _family(*DIT, *ON, "model.repa.layer=1")
    family.loss("main", BATCH, 0, rng())
    family.repa.loss(family.repa_projector, BATCH["image"]).backward()
    first, second = family.transformer.transformer_blocks
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in second.parameters())
    assert family.transformer.proj_out_2.weight.grad is None


def _weights(run):
    latest = sorted((run / "checkpoints").glob("step_*"))[-1]
    return {f"{f.stem}/{k}": v for f in latest.glob("*.safetensors") for k, v in load_file(f).items()}


def _resumed_equals_straight(tmp_path, overrides):
    """4 steps straight, and 2 steps resumed to 4, through the CLI: the same weights, the projector among them."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli("train", *overrides, "trainer.max_steps=4", f"hydra.run.dir={straight}")
    cli("train", *overrides, "trainer.max_steps=2", f"hydra.run.dir={resumed}")
    cli("resume", resumed, "trainer.max_steps=4")
    a, b = _weights(straight), _weights(resumed)
    assert any(k.startswith("repa_projector/") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight


def test_weight_zero_is_todays_run_bitwise(tmp_path):
    cli("train", *DIT, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'plain'}")
    cli("train", *DIT, *ON, "model.repa.weight=0", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'off'}")
    plain, off = _weights(tmp_path / "plain"), _weights(tmp_path / "off")
    assert plain.keys() == off.keys() and all(torch.equal(plain[k], off[k]) for k in plain)


@pytest.mark.parametrize("net,layer", [(DIT, 2), (UNET, 3)])
def test_resume_with_repa_is_bitwise_and_the_export_has_no_projector(tmp_path, net, layer):
    overrides = [*net, *ON, f"model.repa.layer={layer}", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=null",
                 "trainer.grad_accum=2"]
    straight = _resumed_equals_straight(tmp_path, overrides)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all("repa_loss" in row and "diffusion_loss" in row for row in rows)
    assert not any("projector" in p.name or "repa" in p.name for p in (straight / "export").rglob("*"))
    cli("sample", straight, "--n", "4", "--out", tmp_path / "s.png")  # the run rebuilds without the encoder


def test_a_dinov2_from_a_folder_is_an_encoder(tmp_path, one_thread):
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "dinov2")
    family = _family(*DIT, *ON, f"model.repa.encoder=dinov2:{tmp_path / 'dinov2'}", "model.repa.layer=1")
    assert family.repa_projector[-1].out_features == 16
    _, logs = family.loss("main", BATCH, 0, rng())
    assert 0 < logs["repa_loss"] < 2


def test_bad_settings_say_what_to_do(tmp_path):
    from genlab.errors import GenlabError

    with pytest.raises(GenlabError, match="has 2 layers to align"):
        _family(*DIT, *ON, "model.repa.layer=3")
    with pytest.raises(GenlabError, match="use digits_cnn"):
        _family(*DIT, *ON, "model.repa.encoder=clip")
    with pytest.raises(GenlabError, match="cannot be read"):
        _family(*DIT, *ON, f"model.repa.encoder=dinov2:{tmp_path / 'missing'}")


# ---- the MMDiT (model=sd3): an MMDiT block's image stream is what is aligned --------------------------
@pytest.fixture(scope="module")
def sd3_parts(tmp_path_factory):
    """A tiny AutoencoderKL as a genlab VAE run exports it, and a tiny DINOv2 folder (the encoder)."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("sd3_repa")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1, sample_size=16).save_pretrained(root / "vae")
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=28, patch_size=14)).save_pretrained(root / "dinov2")
    return root


def _sd3(parts, **repa):
    from genlab.families.sd3 import StableDiffusion3

    torch.manual_seed(0)
    return StableDiffusion3(16, vae=str(parts / "vae"), tokenizer_dir=str(parts / "tok"),
                            mmdit=dict(num_layers=2, num_attention_heads=2, attention_head_dim=8,
                                       caption_projection_dim=16, patch_size=2),
                            text_encoder=dict(hidden_size=16, num_layers=1), caption_dropout=0.0,
                            repa=repa or None)


def test_sd3_aligns_the_image_tokens_and_keeps_its_diffusion_loss(sd3_parts, one_thread):
    batch = {"image": BATCH["image"].expand(-1, 3, -1, -1).repeat(1, 1, 2, 2), "caption": ["a red circle"] * 4}
    plain, _ = _sd3(sd3_parts).loss("main", batch, 0, rng())
    family = _sd3(sd3_parts, encoder=f"dinov2:{sd3_parts / 'dinov2'}", weight=0.5, layer=1, projector_dim=16)
    total, logs = family.loss("main", batch, 0, rng())
    assert torch.equal(logs["diffusion_loss"], plain.detach())
    assert torch.equal(total.detach(), plain.detach() + 0.5 * logs["repa_loss"])
    assert family.repa.hidden.shape == (4, 16, 16)  # (B, 4 x 4 image tokens, width): not the text stream
    with pytest.raises(Exception, match="data.cache_latents=false"):
        family.repa.loss(family.repa_projector, None)


@pytest.mark.slow  # ~40 s: three tiny sd3 runs through the CLI
def test_sd3_resume_with_repa_is_bitwise(sd3_parts, tmp_path):
    overrides = ["model=sd3", f"model.vae={sd3_parts / 'vae'}", f"model.tokenizer_dir={sd3_parts / 'tok'}",
                 "data=fill_circles", "data.count=16", "data.val_count=4", "trainer=debug", "logger=none",
                 "trainer.sample_every=0", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=null",
                 "model.mmdit.num_layers=2", "model.text_encoder.num_layers=1", "model.sample_steps=2",
                 f"model.repa.encoder=dinov2:{sd3_parts / 'dinov2'}", "model.repa.projector_dim=16"]
    straight = _resumed_equals_straight(tmp_path, overrides)
    assert not (straight / "export" / "repa_projector").exists()


# ---- the latent U-Net (model=sd): a down block's output map is what is aligned --------------------------
def _sd(parts, **repa):
    from genlab.families.sd import StableDiffusion

    torch.manual_seed(0)
    return StableDiffusion(16, vae=str(parts / "vae"), tokenizer_dir=str(parts / "tok"),
                           unet=dict(block_out_channels=[16, 32], norm_num_groups=8, attention_head_dim=8,
                                     layers_per_block=1, down_block_types=["CrossAttnDownBlock2D"] * 2,
                                     up_block_types=["CrossAttnUpBlock2D"] * 2),
                           text_encoder=dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                           caption_dropout=0.0, repa=repa or None)


def test_sd_aligns_a_unet_block_and_keeps_its_diffusion_loss(sd3_parts, one_thread):
    batch = {"image": BATCH["image"].expand(-1, 3, -1, -1).repeat(1, 1, 2, 2), "caption": ["a red circle"] * 4}
    plain, logs = _sd(sd3_parts).loss("main", batch, 0, rng())
    assert set(logs) == {"loss"} and "repa_projector" not in _sd(sd3_parts).networks()
    family = _sd(sd3_parts, encoder=f"dinov2:{sd3_parts / 'dinov2'}", weight=0.5, layer=1, projector_dim=16)
    total, logs = family.loss("main", batch, 0, rng())
    assert torch.equal(logs["diffusion_loss"], plain.detach())
    assert torch.equal(total.detach(), plain.detach() + 0.5 * logs["repa_loss"])
    assert family.repa.hidden.shape == (4, 16, 4, 4)  # the first down block's output: 16 channels, 8 -> 4 latent px
    total.backward()
    assert all(p.grad is not None for p in family.repa_projector.parameters())


@pytest.mark.slow  # ~30 s: three tiny sd runs through the CLI
def test_sd_resume_with_repa_is_bitwise(sd3_parts, tmp_path):
    overrides = ["model=sd", f"model.vae={sd3_parts / 'vae'}", f"model.tokenizer_dir={sd3_parts / 'tok'}",
                 "data=fill_circles", "data.count=16", "data.val_count=4", "trainer=debug", "logger=none",
                 "trainer.sample_every=0", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=null",
                 "model.sample_steps=2", f"model.repa.encoder=dinov2:{sd3_parts / 'dinov2'}", "model.repa.layer=1",
                 "model.repa.projector_dim=16"]
    straight = _resumed_equals_straight(tmp_path, overrides)
    assert not (straight / "export" / "repa_projector").exists()


def test_a_flux_style_transformer_aligns_its_double_blocks_image_stream(sd3_parts, one_thread):
    """Flux's double-stream blocks return (text, image): the image tokens are what is hooked and aligned, and
    the term's gradient reaches the transformer through them (no family trains Flux from scratch; this is
    the term itself on the architecture)."""
    from diffusers import FluxTransformer2DModel

    from genlab.families.repa import build_repa

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    repa = build_repa(flux, {"encoder": f"dinov2:{sd3_parts / 'dinov2'}", "weight": 0.5, "layer": 2,
                             "projector_dim": 16}, image_size=16, channels=3)
    tokens, text = 16, 3  # a 4 x 4 grid of packed latent tokens
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    flux(torch.randn(2, tokens, 16), encoder_hidden_states=torch.randn(2, text, 16),
         pooled_projections=torch.randn(2, 16), timestep=torch.tensor([0.5, 0.5]),
         img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3))
    assert repa.hidden.shape == (2, tokens, 16)  # the image stream, not the text's 3 tokens
    loss = repa.loss(repa.projector, torch.rand(2, 3, 16, 16) * 2 - 1)
    loss.backward()
    assert 0 < loss.item() < 2
    assert flux.transformer_blocks[0].attn.to_q.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in flux.single_transformer_blocks.parameters())  # after the aligned layer
