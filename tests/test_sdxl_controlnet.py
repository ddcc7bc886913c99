"""ControlNet on an SDXL base (a tiny stand-in: SDXL's blocks, text_time conditioning and two text
encoders, random weights): trains through `genlab train` with grad_accum=2, resumes bitwise,
samples through `genlab sample`, and its export samples the same in plain diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UniPCMultistepScheduler
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate

from conftest import assert_same_up_to_rounding, cli, compose, rng
from genlab.data.fill_circles import FillCircles
from genlab.families import latent_diffusion as ld
from genlab.families import quantize, stand_ins
from genlab.families.controlnet import ControlNet
from genlab.sample import load_family
from test_resume_exact import _assert_resume_is_bitwise

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = ["model=controlnet", "model.lora.rank=4", "data=fill_circles", "data.count=16", "data.val_count=4",
         "trainer=debug", "logger=none", "trainer.batch_size=2", "trainer.grad_accum=2", "trainer.sample_every=0",
         "model.sample_steps=2", "trainer.keep_checkpoints=null", "trainer.lr=0.05"]


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return stand_ins.save_sdxl(root / "base", tokenizer_dir=str(root / "tok"))


@pytest.fixture(scope="module")
def sdxl_run(sdxl_base, tmp_path_factory):
    run = tmp_path_factory.mktemp("cn") / "run"
    cli("train", *TRAIN, f"model.base={sdxl_base}", "trainer.max_steps=2", f"hydra.run.dir={run}")
    return run


def test_sdxl_conditioning_reaches_unet_and_controlnet(sdxl_run):
    family, _ = load_family(sdxl_run, "latest")
    assert family.kind == "sdxl" and family.controlnet.config.addition_embed_type == "text_time"
    text = family.text_conditioning({}, ["a red circle", ""])
    assert text["encoder_hidden_states"].shape == (2, 77, 64)  # both encoders' hidden states (32 + 32)
    assert text["added_cond_kwargs"]["text_embeds"].shape == (2, 32)  # the second encoder's pooled projection
    assert text["added_cond_kwargs"]["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]
    # Training conditions as diffusers' SDXL pipeline does when sampling.
    pipe = family.pipeline("unipc")
    hidden, _, pooled, _ = pipe.encode_prompt(["a red circle", ""], do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=hidden.dtype, text_encoder_projection_dim=32)
    assert_same_up_to_rounding(hidden, text["encoder_hidden_states"])  # genlab's encoding vs the pipeline's
    assert_same_up_to_rounding(pooled, text["added_cond_kwargs"]["text_embeds"])
    assert torch.equal(time_ids.repeat(2, 1), text["added_cond_kwargs"]["time_ids"])
    # The pooled prompt and the time ids change the U-Net's output: they are really read.
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        base = family.unet(latents, t, **text).sample
        other = {**text["added_cond_kwargs"], "time_ids": text["added_cond_kwargs"]["time_ids"] * 2}
        assert not torch.allclose(base, family.unet(latents, t, text["encoder_hidden_states"], added_cond_kwargs=other).sample)


def test_sdxl_export_samples_the_same_in_plain_diffusers(sdxl_run, sdxl_base, tmp_path):
    export = sdxl_run / "export"
    assert (export / "controlnet" / "config.json").exists() and (export / "pytorch_lora_weights.safetensors").exists()
    val = FillCircles("val", count=16, val_count=4)
    sketch, caption = val[0]["sketch"], val[0]["caption"]
    family, _ = load_family(sdxl_run, "latest")
    ours = family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2)

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        sdxl_base, controlnet=ControlNetModel.from_pretrained(export / "controlnet"))
    pipe.load_lora_weights(export)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(caption, image=sketch[None], height=32, width=32, num_inference_steps=2,
                  guidance_scale=family.guidance, generator=ld.generators(1, 3), output_type="pt").images * 2 - 1
    assert torch.allclose(ours, theirs, atol=1e-5)
    # The ControlNet was trained (it moved from the U-Net copy) and steers the image.
    off = family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2, control_scale=0.0)
    assert (ours - off).abs().max() > 1e-3

    # `genlab sample --sketch --prompt` on the run.
    Image.fromarray((sketch.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "s.png")
    cli("sample", sdxl_run, "--sketch", tmp_path / "s.png", "--prompt", caption, "--n", "2", "--steps", "2",
        "--out", tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size[0] >= 64


def test_sdxl_controlnet_resume_is_bitwise(tmp_path, sdxl_base):
    def cfg_for(steps):
        return compose(*TRAIN, f"model.base={sdxl_base}", f"trainer.max_steps={steps}", "trainer.checkpoint_every=1",
                       "model.caption_dropout=0.5")

    _assert_resume_is_bitwise(tmp_path, cfg_for, 1)


@pytest.mark.parametrize("options", [dict(lora=dict(rank=0), control_lora=dict(rank=4)),
                                     dict(lora=dict(rank=4, variant="loha")),
                                     dict(lora=dict(rank=4), quantize_base="int8")], ids=["control_lora", "loha", "int8"])
def test_sdxl_takes_control_lora_lora_variants_and_a_quantised_base(sdxl_base, tmp_path, options):
    family = ControlNet(32, base=str(sdxl_base), **options)
    data = FillCircles("train", image_size=32, count=4)
    loss, _ = family.loss("main", default_collate([data[i] for i in range(2)]), 0, rng(0))
    loss.backward()
    trainable = [p for g in family.param_groups()["main"] for p in g["params"]]
    assert torch.isfinite(loss) and trainable and all(p.grad is not None for p in trainable)
    family.export(tmp_path)
    if "control_lora" in options:
        assert (tmp_path / "control_lora.safetensors").stat().st_size < 0.5 * sum(
            f.stat().st_size for f in (tmp_path / "controlnet").glob("*.safetensors"))
    else:
        keys = load_file(tmp_path / "lora_kohya.safetensors")
        assert keys and all(k.startswith("lora_unet_") for k in keys)
        assert any(k.endswith(".hada_w1_a") for k in keys) == (options["lora"].get("variant") == "loha")
    assert quantize.is_quantized(family.unet) == ("quantize_base" in options)
