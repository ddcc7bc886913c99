"""SD and ControlNet through the real loop on a tiny chain: trainable-only checkpoints, bitwise resume,
relative paths that keep working from any directory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import compose, genlab
from genlab.config import absolute_paths
from genlab.families import latent_diffusion as ld
from genlab.resume import apply_overrides
from genlab.sample import load_family
from genlab.train.checkpoint import complete_checkpoints
from genlab.train.job import run_training
from test_resume_exact import _assert_resume_is_bitwise, _losses, _straight_and_resumed

pytestmark = pytest.mark.usefixtures("one_thread")

# Cross-attention only at the lowest level, 32 px fill_circles: a step takes well under a second.
TINY_UNET = ["model.unet.block_out_channels=[16,32]", "model.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
             "model.unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]", "model.unet.norm_num_groups=8",
             "model.text_encoder.hidden_size=32"]
COMMON = ["trainer=debug", "logger=none", "trainer.batch_size=4", "trainer.sample_every=0", "model.sample_steps=2",
          "trainer.keep_checkpoints=null"]
CIRCLES = ["data=fill_circles", "data.count=64", "data.val_count=8"]


def train(cfg, run, resume=False):
    """`run_training` plus the saved config that Hydra writes for `genlab train` (read by sample/resume)."""
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run_training(cfg, run, resume=resume)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A genlab-VAE-like run: export/ is an AutoencoderKL (4x down) with a scaling_factor."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("vae") / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model: {}\n")  # what makes it a run (RunDir.is_run)
    AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1, sample_size=32, scaling_factor=0.5).save_pretrained(run / "export")
    return run


@pytest.fixture(scope="module")
def sd_config(vae_run, tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("tok")

    def cfg_for(steps, *extra):
        return compose("model=sd", f"model.vae={vae_run}", f"model.tokenizer_dir={tok_dir}", *TINY_UNET, *COMMON, *CIRCLES,
                       f"trainer.max_steps={steps}", *extra)
    return cfg_for


@pytest.fixture(scope="module")
def sd_run(sd_config, tmp_path_factory):
    """A tiny SD base trained 2 steps from scratch through the loop, with its export/."""
    run = tmp_path_factory.mktemp("sd") / "run"
    train(sd_config(2), run)
    return run


def cn_config(base, steps, *extra, data=tuple(CIRCLES)):
    return compose("model=controlnet", f"model.base={base}", "model.lora.rank=4", "trainer.grad_accum=2", *COMMON,
                   *data, f"trainer.max_steps={steps}", *extra)


def test_lora_checkpoint_holds_only_the_lora_and_still_samples_and_resumes(tmp_path, sd_run):
    run = tmp_path / "cn"
    train(cn_config(sd_run, 2), run)
    checkpoint = complete_checkpoints(run / "checkpoints")[-1]
    unet_file = checkpoint / "unet.safetensors"
    with safe_open(unet_file, "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    full = sd_run / "export" / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet_file.stat().st_size < 0.1 * full.stat().st_size  # 51 KB of LoRA against a 1 MB tiny U-Net
    assert "lora_" not in " ".join(load_file(checkpoint / "controlnet.safetensors"))  # the ControlNet trains whole

    # `genlab sample`'s loader: the base U-Net from model.base, the LoRA from the checkpoint.
    family, _ = load_family(run, "latest")
    assert torch.equal(family.unet.conv_in.weight, load_file(full)["conv_in.weight"])
    exported = load_file(run / "export" / "pytorch_lora_weights.safetensors")
    reloaded = load_file(ld.save_unet_lora(family.unet, tmp_path / "reloaded"))
    assert exported.keys() == reloaded.keys() and all(torch.equal(exported[k], reloaded[k]) for k in exported)
    assert torch.isfinite(family.sample(2, seed=0, steps=2)).all()

    train(cn_config(sd_run, 4), run, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_sd_resume_is_bitwise(tmp_path, sd_config):
    """SD from scratch: U-Net and text encoder train, EMA on, captions dropped at random."""
    def cfg_for(steps):
        return sd_config(steps, "trainer.grad_accum=2", "trainer.checkpoint_every=2", "model.caption_dropout=0.5",
                         "trainer.sample_every=2", "trainer.sample_n=2")

    _assert_resume_is_bitwise(tmp_path, cfg_for, 2)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """16 photos of circles (32 px PNGs) for the sketch_folder data: Canny or XDoG edges, random thresholds."""
    from PIL import Image

    from genlab.data.fill_circles import FillCircles

    folder = tmp_path_factory.mktemp("photos")
    circles = FillCircles(count=16)
    for i in range(16):
        pixels = (circles[i]["image"].permute(1, 2, 0).numpy() * 127.5 + 127.5).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.parametrize("variant", ["lora", "control_lora", "sketch_folder"])
def test_controlnet_resume_is_bitwise(tmp_path, sd_run, photo_folder, variant):
    extra, data = {
        # ControlNet + LoRA (with dropout) on the base U-Net; validation grids drawn between steps must not matter.
        "lora": (["model.lora.dropout=0.1", "trainer.sample_every=2", "trainer.sample_n=2"], CIRCLES),
        "control_lora": (["model.lora.rank=0", "model.control_lora.rank=4"], CIRCLES),  # the ControlNet copy is frozen
        # Photos -> sketches with per-item random edge thresholds (training split).
        "sketch_folder": ([], ["data=sketch_folder", f"data.path={photo_folder}", "data.image_size=32",
                               "data.num_workers=0", f"data.cache_dir={tmp_path / 'sketches'}", "data.val_fraction=0.25",
                               "data.caption=a circle"]),
    }[variant]

    def cfg_for(steps):
        return cn_config(sd_run, steps, "trainer.checkpoint_every=2", "model.caption_dropout=0.5", *extra, data=data)

    _assert_resume_is_bitwise(tmp_path, cfg_for, 2)


def test_controlnet_draws_do_not_need_the_global_rng(tmp_path, sd_run, monkeypatch):
    """Noise, timesteps and caption dropout come from StepRandom (seed, step, sample), not the global
    RNG: a resume that does not restore the global RNG still continues the straight run exactly."""
    from genlab.train import loop

    monkeypatch.setattr(loop, "_set_rng_state", lambda state: None)

    def cfg_for(steps):
        return cn_config(sd_run, steps, "trainer.checkpoint_every=2")

    straight, resumed = _straight_and_resumed(tmp_path, cfg_for, 2)
    assert _losses(straight) == _losses(resumed)


def test_relative_paths_are_saved_absolute(tmp_path, monkeypatch):
    (tmp_path / "runs" / "sd").mkdir(parents=True)
    (tmp_path / "photos").mkdir()
    cfg = compose("model=controlnet", "model.base=runs/sd", "model.vae=someone/sd-vae", "model.controlnet.pretrained=./cn",
                  "data=sketch_folder", "data.path=photos", "data.cache_dir=cache", "eval.cache_dir='~/cache'")
    assert absolute_paths(cfg, tmp_path) == {
        "model.base": str(tmp_path / "runs" / "sd"), "model.controlnet.pretrained": str(tmp_path / "cn"),
        "data.path": str(tmp_path / "photos"), "data.cache_dir": str(tmp_path / "cache")}
    assert cfg.model.vae == "someone/sd-vae" and cfg.eval.cache_dir == "~/cache"  # a hub id, a home path
    assert cfg.model.validation_data.path == str(tmp_path / "photos")  # the family's view of the data follows
    assert absolute_paths(cfg, tmp_path / "elsewhere") == {}
    monkeypatch.chdir(tmp_path / "runs")  # `genlab resume RUN model.base=sd` from runs/: the override's path too
    assert apply_overrides(cfg, ["model.base=sd"]).model.base == str(tmp_path / "runs" / "sd")


@pytest.mark.slow  # three CLI processes: ~50 s on 2 busy cores
def test_a_run_trained_with_relative_paths_samples_and_resumes_from_elsewhere(tmp_path, vae_run):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(vae_run, work / "vae")
    elsewhere.mkdir()
    env = {"OMP_NUM_THREADS": "1"}
    genlab("train", "model=sd", "model.vae=vae", "model.tokenizer_dir=tok", *TINY_UNET, *COMMON, *CIRCLES,
           "trainer.max_steps=2", "hydra.run.dir=runs/sd", cwd=work, env=env)
    run = work / "runs" / "sd"
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert (saved.model.vae, saved.model.tokenizer_dir) == (str(work / "vae"), str(work / "tok"))
    genlab("sample", str(run), "--n", "1", "--steps", "2", "--out", "grid.png", cwd=elsewhere, env=env)
    assert (elsewhere / "grid.png").exists()
    genlab("resume", str(run), "trainer.max_steps=3", cwd=elsewhere, env=env)
    assert json.loads((run / "status.json").read_text())["step"] == 3
