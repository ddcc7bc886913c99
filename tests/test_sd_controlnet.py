"""SD and ControlNet families on tiny models: training signal, frozen parts, exports in plain diffusers."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import (AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                       UniPCMultistepScheduler)
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

from conftest import compose, genlab, rng
from genlab.data import build_dataset
from genlab.data.fill_circles import FillCircles
from genlab.diffusion import Diffusion
from genlab.errors import ConfigError, GenlabError
from genlab.families import latent_diffusion as ld
from genlab.families.controlnet import ControlNet, hint_channels
from genlab.families.sd import StableDiffusion

CPU = torch.device("cpu")
# Cross-attention only at the 4x4 level: keeps a training step well under a second on 2 busy cores.
UNET = dict(block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
VAL = {"_target_": "genlab.data.fill_circles.FillCircles", "count": 16, "val_count": 8, "num_workers": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_run(root: Path) -> Path:
    """A directory that looks like a finished genlab run (its export/ is filled by the caller)."""
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "config.yaml").write_text("model: {}\n")  # what makes it a run (RunDir.is_run)
    return root


def batch(n=4, start=0):
    ds = FillCircles("train", image_size=32, count=64)
    return default_collate([ds[i] for i in range(start, start + n)])


def train(family, steps, lr=1e-3, data=None):
    params = [p for g in family.param_groups()["main"] for p in g["params"]]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        loss, logs = family.loss("main", data or batch(), step, rng(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(logs["loss"].item())
    return losses


def pipe_images(pipe, prompts, seed=0, steps=2, **kw):
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, height=32, width=32, num_inference_steps=steps, guidance_scale=5.0,
               generator=ld.generators(len(prompts), seed), output_type="pt", **kw).images
    return out * 2 - 1


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A genlab-VAE-like run: export/ is an AutoencoderKL (4x down) with a scaling_factor."""
    torch.manual_seed(0)
    run = fake_run(tmp_path_factory.mktemp("vae") / "run")
    AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1, sample_size=32, scaling_factor=0.5).save_pretrained(run / "export")
    return run


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, vae_run, tok_dir):
    """A tiny SD trained 12 steps from scratch on fill_circles and exported; returns (run, losses, family)."""
    torch.manual_seed(0)
    family = StableDiffusion(32, vae=str(vae_run), unet=UNET, text_encoder=dict(hidden_size=32, num_layers=2),
                             tokenizer_dir=tok_dir, caption_dropout=0.0, validation_data=VAL).to(CPU)
    fixed = batch()
    embeddings = family.text_encoder.get_input_embeddings().weight.detach().clone()
    losses = train(family, 12, lr=2e-3, data=fixed)
    # From scratch the random text encoder trains too: the rows of seen tokens ("circle") move most.
    moved = (family.text_encoder.get_input_embeddings().weight - embeddings).abs().sum(1)
    assert set(family.networks()) == {"unet", "text_encoder"} and moved[7117] > 10 * moved.median()
    run = fake_run(tmp_path_factory.mktemp("sd") / "run")
    family.export(run / "export")
    return run, losses, family


def test_resolve_pretrained(tmp_path, vae_run, sd_run):
    run = sd_run[0]
    assert ld.resolve_pretrained(str(run), "unet") == (str(run / "export" / "unet"), None)
    # A VAE run's export/ is the AutoencoderKL itself: no vae/ subfolder needed.
    assert ld.resolve_pretrained(str(vae_run), "vae") == (str(vae_run / "export"), None)
    assert ld.resolve_pretrained("someone/some-sd", "unet") == ("someone/some-sd", "unet")
    with pytest.raises(GenlabError, match="no export/"):
        ld.resolve_pretrained(str(fake_run(tmp_path / "unfinished")), "unet")
    with pytest.raises(GenlabError, match="no such directory"):
        ld.resolve_pretrained(str(tmp_path / "missing"), "unet")


def test_lora_arguments(tmp_path):
    assert ld.parse_loras(["a/b.safetensors:0.5", "runs/x", ("c", 2)]) == [("a/b.safetensors", 0.5), ("runs/x", 1.0), ("c", 2.0)]
    assert ld.parse_loras(["C:/loras/x"]) == [("C:/loras/x", 1.0)]  # a colon that is no weight
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert ld.resolve_lora(tmp_path) == {"pretrained_model_name_or_path_or_dict": str(tmp_path)}
    assert ld.resolve_lora(tmp_path / "pytorch_lora_weights.safetensors")["weight_name"] == "pytorch_lora_weights.safetensors"
    with pytest.raises(GenlabError, match="no pytorch_lora_weights"):
        ld.resolve_lora(fake_run(tmp_path / "run"))


def test_hint_encoder_matches_the_vae():
    assert hint_channels(8, None) == (16, 32, 96, 256) and hint_channels(4, None) == (16, 32, 96)
    assert hint_channels(2, [8, 8]) == (8, 8)
    with pytest.raises(ConfigError, match="needs 2 entries"):
        hint_channels(2, [8, 8, 8])


def test_min_snr_weighting_and_caption_dropout():
    core = Diffusion.build(objective="epsilon", schedule="scaled_linear")
    torch.manual_seed(0)
    latents, pred = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    noisy, t, noise, weight = core.training_inputs(latents, rng())
    plain_mse = ((pred - noise) ** 2).mean()
    assert torch.allclose(core.loss(pred, noise, weight), plain_mse)
    sched = core.scheduler
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    weighted = Diffusion(sched, weighting="min_snr", snr_gamma=5.0)
    expected = (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / snr).mean()
    assert torch.allclose(weighted.loss(pred, noise, weighted.ddpm_weight(t)), expected, rtol=1e-5)
    _, uniform, _, _ = core.training_inputs(torch.randn(4000, 1, 1, 1), rng())
    _, cubic, _, _ = Diffusion(sched, timesteps="cubic").training_inputs(torch.randn(4000, 1, 1, 1), rng())  # t = (1 - u^3) T
    assert 0.45 < (uniform >= 500).float().mean() < 0.55 and 0.75 < (cubic >= 500).float().mean() < 0.83  # P(u^3 <= 0.5) = 0.79
    with pytest.raises(ConfigError, match="uniform, logit_normal, mode, cubic"):
        Diffusion(sched, timesteps="cubc")
    caps = ["a", "b", "c", "d"] * 50
    assert ld.drop_captions(caps, 0.0, rng()) == caps and set(ld.drop_captions(caps, 1.0, rng())) == {""}
    assert 60 < ld.drop_captions(caps, 0.5, rng()).count("") < 140


def test_sd_learns_samples_by_prompt_and_exports_a_pipeline(sd_run):
    run, losses, family = sd_run
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])  # overfits a fixed batch
    prompts = FillCircles("val", count=16, val_count=8)
    assert family.default_prompts(4)[:4] == [prompts[i]["caption"] for i in range(4)]
    a, b = family.sample(4, seed=1, steps=2), family.sample(4, seed=1, steps=2)
    assert a.shape == (4, 3, 32, 32) and a.min() >= -1 and a.max() <= 1 and torch.equal(a, b)
    assert not torch.allclose(a, family.sample(4, seed=2, steps=2))
    red = family.sample(2, seed=1, steps=2, prompt="a red circle on a blue background")
    assert not torch.allclose(red, family.sample(2, seed=1, steps=2, prompt="a white circle on a black background"))
    # The export is a plain StableDiffusionPipeline that draws the same images.
    pipe = StableDiffusionPipeline.from_pretrained(run / "export")
    assert pipe.vae.config.scaling_factor == 0.5 and len(pipe.tokenizer) == 49408
    plain = pipe_images(pipe, ["a red circle on a blue background"] * 2, seed=1)
    assert torch.allclose(plain, red, atol=1e-5)
    with pytest.raises(GenlabError, match="sketch"):
        family.sample(1, 0, sketch=torch.zeros(3, 32, 32))


def test_sd_lora_finetune_keeps_base_and_exports_loadable_lora(sd_run, tmp_path):
    run, _, _ = sd_run
    torch.manual_seed(0)
    family = StableDiffusion(32, base=str(run), lora=dict(rank=4, alpha=8), validation_data=VAL).to(CPU)
    trainable = [n for n, p in family.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and family.ema_network is None
    assert set(family.networks()) == {"unet"} and not any(p.requires_grad for p in family.text_encoder.parameters())
    before = family.unet.conv_in.weight.detach().clone()
    train(family, 3, lr=1e-2)
    assert torch.equal(before, family.unet.conv_in.weight)
    prompt = ["a green circle on a white background"] * 2
    tuned = family.sample(2, seed=3, steps=2, prompt=prompt)
    assert not torch.allclose(tuned, family.sample(2, seed=3, steps=2, prompt=prompt, own_lora=0.0))
    # Stacking this run's own LoRA file at weight 0 changes nothing; at 1 it doubles the effect.
    family.export(tmp_path / "export")
    assert torch.allclose(tuned, family.sample(2, 3, steps=2, prompt=prompt, lora=[f"{tmp_path / 'export'}:0"]), atol=1e-6)
    assert not torch.allclose(tuned, family.sample(2, 3, steps=2, prompt=prompt, lora=[str(tmp_path / "export")]))
    base = StableDiffusionPipeline.from_pretrained(run / "export")
    base.load_lora_weights(tmp_path / "export")
    assert torch.allclose(pipe_images(base, prompt, seed=3), tuned, atol=1e-5)
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "export")  # LoRA fused into the U-Net
    assert torch.allclose(pipe_images(merged, prompt, seed=3), tuned, atol=1e-4)


def test_controlnet_starts_as_the_base_and_trains_only_its_parts(sd_run):
    run, _, _ = sd_run
    torch.manual_seed(0)
    family = ControlNet(32, base=str(run), lora=dict(rank=4), caption_dropout=0.0, validation_data=VAL).to(CPU)
    assert set(family.networks()) == {"controlnet", "unet"}
    assert family.controlnet.controlnet_cond_embedding.blocks[-1].out_channels == 96  # 3 stages for the 4x VAE
    # Zero convolutions: an untrained ControlNet adds nothing to the base U-Net.
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    down, mid = family.controlnet(x, t, text, controlnet_cond=batch(2)["sketch"], return_dict=False)
    with torch.no_grad():
        plain = family.unet(x, t, text).sample
        with_cn = family.unet(x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert torch.equal(plain, with_cn)
    # A random hint conv (zero_init_hint=false) still adds nothing at step 0: the zero convs see to it.
    torch.manual_seed(0)
    random_hint = ControlNet(32, base=str(run), controlnet=dict(zero_init_hint=False), validation_data=VAL).to(CPU)
    assert random_hint.controlnet.controlnet_cond_embedding.conv_out.weight.abs().sum() > 0
    down, mid = random_hint.controlnet(x, t, text, controlnet_cond=batch(2)["sketch"], return_dict=False)
    with torch.no_grad():
        assert torch.equal(plain, family.unet(x, t, text, down_block_additional_residuals=down,
                                              mid_block_additional_residual=mid).sample)
    unet_trainable = [n for n, p in family.unet.named_parameters() if p.requires_grad]
    assert unet_trainable and all("lora_" in n for n in unet_trainable)
    assert all(p.requires_grad for p in family.controlnet.parameters())
    frozen = {"vae": family.vae.encoder.conv_in.weight, "text": family.text_encoder.get_input_embeddings().weight,
              "unet": family.unet.conv_in.weight}
    before = {k: v.detach().clone() for k, v in frozen.items()}
    zero_conv = family.controlnet.controlnet_down_blocks[0].weight.detach().clone()
    train(family, 2, lr=1e-3)
    assert all(torch.equal(before[k], frozen[k]) for k in frozen)
    assert not torch.equal(zero_conv, family.controlnet.controlnet_down_blocks[0].weight)


def test_controlnet_export_generates_the_same_in_plain_diffusers(sd_run, tmp_path):
    run, _, _ = sd_run
    torch.manual_seed(0)
    family = ControlNet(32, base=str(run), lora=dict(rank=4, alpha=4), validation_data=VAL).to(CPU)
    train(family, 2, lr=1e-2)
    ours = family.sample(3, seed=5, steps=2)  # the val pairs: sketches and captions
    family.export(tmp_path)
    assert {"controlnet", "pytorch_lora_weights.safetensors", "genlab_export.json"} <= {p.name for p in tmp_path.iterdir()}
    info = json.loads((tmp_path / "genlab_export.json").read_text())
    assert info["base"] == str((run / "export").resolve()) and info["lora_rank"] == 4
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        run / "export", controlnet=ControlNetModel.from_pretrained(tmp_path / "controlnet"), safety_checker=None)
    pipe.load_lora_weights(tmp_path)
    val = FillCircles("val", count=16, val_count=8)
    theirs = pipe_images(pipe, [val[i]["caption"] for i in range(3)], seed=5,
                         image=torch.stack([val[i]["sketch"] for i in range(3)]))
    assert torch.allclose(ours, theirs, atol=1e-5)
    pairs = family.sample_pairs(3, seed=5, steps=2)  # for validation grids: sketch | output
    assert pairs.shape == (3, 3, 32, 64) and torch.allclose(pairs[..., 32:], ours)
    assert torch.allclose(pairs[..., :32], torch.stack([val[i]["sketch"] for i in range(3)]) * 2 - 1)
    # A user's sketch as a file, a prompt, a control scale of 0 (= the base with its LoRA).
    Image.fromarray((val[0]["sketch"].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "s.png")
    from_file = family.sample(1, seed=5, steps=2, sketch=tmp_path / "s.png", prompt=val[0]["caption"])
    assert torch.allclose(from_file, ours[:1], atol=1e-5)
    off = family.sample(1, seed=5, steps=2, sketch=tmp_path / "s.png", prompt=val[0]["caption"], control_scale=0.0)
    assert not torch.allclose(off, ours[:1], atol=1e-3)


def test_control_lora_trains_a_small_set_and_merges_on_export(sd_run, tmp_path):
    run, _, _ = sd_run
    torch.manual_seed(0)
    family = ControlNet(32, base=str(run), lora=dict(rank=0), control_lora=dict(rank=4), validation_data=VAL).to(CPU)
    assert set(family.networks()) == {"controlnet"}
    new_parts = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
    names = [n for n, p in family.controlnet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith(new_parts) for n in names)
    assert any("lora_" in n for n in names) and not any(p.requires_grad for p in family.unet.parameters())
    assert all(any(n.startswith(part) for n in names) for part in new_parts)  # zero convs and hint encoder train
    train(family, 2, lr=1e-2)
    ours = family.sample(2, seed=0, steps=2)
    family.export(tmp_path)
    from safetensors.torch import load_file

    small, full = load_file(tmp_path / "control_lora.safetensors"), ControlNetModel.from_pretrained(tmp_path / "controlnet")
    assert sum(v.numel() for v in small.values()) < 0.5 * sum(p.numel() for p in full.parameters())
    pipe = StableDiffusionControlNetPipeline.from_pretrained(run / "export", controlnet=full, safety_checker=None)
    val = FillCircles("val", count=16, val_count=8)
    theirs = pipe_images(pipe, [val[i]["caption"] for i in range(2)], image=torch.stack([val[i]["sketch"] for i in range(2)]))
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_mixed_precision_keeps_trainable_weights_fp32(sd_run):
    run, _, _ = sd_run
    family = ControlNet(32, base=str(run), lora=dict(rank=4), gradient_checkpointing=True, validation_data=VAL)
    family.to(CPU, torch.bfloat16)
    assert family.vae.dtype == family.text_encoder.dtype == torch.bfloat16
    assert family.unet.conv_in.weight.dtype == torch.bfloat16
    trainable = [p for g in family.param_groups()["main"] for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in trainable)
    family.controlnet.train(), family.unet.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = family.loss("main", batch(2), 0, rng(0))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    # fp16 on CPU runs without autocast under Accelerate: frozen parts stay fp32 there.
    assert family.to(CPU, torch.float16).vae.dtype == torch.float32


def test_bad_options_say_what_to_fix(sd_run):
    with pytest.raises(ConfigError, match="model.base"):
        ControlNet(32)
    with pytest.raises(ConfigError, match="model.vae"):
        StableDiffusion(32)
    with pytest.raises(ConfigError, match="model.base"):  # LoRA checkpoints rebuild the frozen U-Net from a base
        StableDiffusion(32, vae=str(sd_run[0]), lora=dict(rank=4))
    with pytest.raises(GenlabError, match="sampler"):
        ControlNet(32, base=str(sd_run[0]), sampler="euler")
    family = sd_run[2]
    with pytest.raises(GenlabError, match="lora"):
        family.sample(1, 0, lora=[str(sd_run[0])])  # an sd run without LoRA has no LoRA file


def test_model_configs_build_the_tiny_chain(vae_run, sd_run, tok_dir):
    cfg = compose("model=sd", "data=fill_circles", f"model.vae={vae_run}", f"model.tokenizer_dir={tok_dir}")
    sd = instantiate(cfg.model, _convert_="all")
    assert sd.unet.config.sample_size == 8 and sd.unet.config.cross_attention_dim == 32
    cfg = compose("experiment=controlnet_circles", f"model.base={sd_run[0]}")
    assert cfg.trainer.batch_size == 32 and cfg.model.lora.rank == 4 and cfg.data.image_size == 32
    cn = instantiate(cfg.model, _convert_="all").to(CPU)
    data = build_dataset(cfg.data, "train")
    loss, _ = cn.loss("main", default_collate([data[i] for i in range(2)]), 0, rng(0))
    assert torch.isfinite(loss)


def test_sd15_recipe_composes_and_builds_from_tiny_stand_ins(sd_run, tmp_path):
    cfg = compose("experiment=controlnet_sketch_sd15", "data.path=/data/photos")
    assert cfg.model.base == "stable-diffusion-v1-5/stable-diffusion-v1-5" and cfg.data.image_size == 512
    assert (cfg.trainer.mixed_precision, cfg.trainer.batch_size, cfg.trainer.grad_accum) == ("fp16", 8, 2)
    assert cfg.model.lora.rank > 0 and cfg.model.gradient_checkpointing
    # The same recipe on stand-ins: the tiny base instead of the hub's, 32 px photos of circles.
    for i in range(4):
        Image.fromarray((FillCircles(count=4)[i]["image"].permute(1, 2, 0).numpy() * 127.5 + 127.5).astype("uint8")).save(tmp_path / f"{i}.png")
    cfg = compose("experiment=controlnet_sketch_sd15", f"data.path={tmp_path}", "data.image_size=32",
                  f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.25", f"model.base={sd_run[0]}")
    family = instantiate(OmegaConf.to_container(cfg.model, resolve=True), _convert_="all").to(CPU, torch.bfloat16)
    data = build_dataset(cfg.data, "train")
    assert len(data) == 3 and family.unet.is_gradient_checkpointing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = family.loss("main", default_collate([data[i] for i in range(2)]), 0, rng(0))
    assert torch.isfinite(loss)
    assert family.sample(1, 0, steps=2).shape == (1, 3, 32, 32)  # a val sketch + its (empty) caption


@pytest.fixture(scope="module")
def cn_run(tmp_path_factory, sd_run):
    """A ControlNet + LoRA run (2 steps) on the tiny SD base, as `genlab train` leaves it."""
    from genlab.run_dir import RunDir
    from genlab.train.job import run_training

    root = tmp_path_factory.mktemp("cn") / "run"
    cfg = compose("model=controlnet", f"model.base={sd_run[0]}", "model.lora.rank=4", "data=fill_circles",
                  "data.count=16", "data.val_count=4", "trainer=debug", "logger=none", "trainer.batch_size=4",
                  "trainer.max_steps=2", "trainer.sample_every=0", "model.sample_steps=2",
                  "trainer.lr=0.05")  # big steps: the zero convolutions move enough to show in 8-bit PNGs
    RunDir(root).write_config(cfg)
    run_training(cfg, root)
    return root


def _cli_sample(run, out, *options) -> bytes:
    from typer.testing import CliRunner

    from genlab.cli import app

    result = CliRunner().invoke(app, ["sample", str(run), "--n", "1", "--steps", "2", "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return out.read_bytes()


def test_sample_options_reach_the_controlnet(cn_run, tmp_path):
    """--edges-from, --sketch, --control-scale and stacked --lora, through the real command."""
    val = FillCircles("val", count=16, val_count=4)
    for i, name in enumerate(("a", "b")):
        Image.fromarray(((val[i]["image"].permute(1, 2, 0).numpy() + 1) * 127.5).astype("uint8")).save(tmp_path / f"{name}.png")
    prompt = ["--prompt", val[0]["caption"]]
    edges_a = _cli_sample(cn_run, tmp_path / "ea.png", "--edges-from", str(tmp_path / "a.png"), *prompt)
    edges_b = _cli_sample(cn_run, tmp_path / "eb.png", "--edges-from", str(tmp_path / "b.png"), *prompt)
    assert edges_a != edges_b  # the sketch made from each photo steers the image
    off_a = _cli_sample(cn_run, tmp_path / "oa.png", "--edges-from", str(tmp_path / "a.png"), "--control-scale", "0", *prompt)
    off_b = _cli_sample(cn_run, tmp_path / "ob.png", "--sketch", str(tmp_path / "b.png"), "--control-scale", "0", *prompt)
    assert off_a == off_b != edges_a  # at scale 0 the ControlNet, and so the sketch, does nothing
    # Stacked LoRAs: a second adapter (the run's own, scaled up) changes the image; at weight 0 it does not.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    own = cn_run / "export" / "pytorch_lora_weights.safetensors"
    with safe_open(own, "pt") as f:
        metadata = f.metadata()
    (tmp_path / "loud").mkdir()
    save_file({k: v * 300 for k, v in load_file(own).items()}, tmp_path / "loud" / own.name, metadata=metadata)
    one = _cli_sample(cn_run, tmp_path / "l1.png", "--edges-from", str(tmp_path / "a.png"), *prompt)
    two = _cli_sample(cn_run, tmp_path / "l2.png", "--edges-from", str(tmp_path / "a.png"), *prompt,
                      "--lora", f"{tmp_path / 'loud'}:1.0")
    zero = _cli_sample(cn_run, tmp_path / "l0.png", "--edges-from", str(tmp_path / "a.png"), *prompt,
                       "--lora", f"{tmp_path / 'loud'}:0", "--lora", f"{cn_run / 'export'}:0")
    assert one == edges_a and two != one and zero == one


@pytest.mark.slow
def test_offline_chain_through_the_cli(tmp_path):
    """vae -> sd -> controlnet (+LoRA, grad_accum=2) on fill_circles, then the exports in plain diffusers."""
    common = ["data=fill_circles", "trainer=debug", "logger=none", "trainer.batch_size=4", "trainer.sample_n=2",
              "data.count=64", "data.val_count=8"]
    runs = {name: tmp_path / name for name in ("vae", "sd", "cn")}
    env = {"OMP_NUM_THREADS": "1"}  # see one_thread()
    genlab("train", "model=vae", *common, f"hydra.run.dir={runs['vae']}", env=env)
    genlab("train", "model=sd", f"model.vae={runs['vae']}", "model.sample_steps=2", f"model.tokenizer_dir={tmp_path / 'tok'}",
           *common, f"hydra.run.dir={runs['sd']}", env=env)
    genlab("train", "model=controlnet", f"model.base={runs['sd']}", "model.lora.rank=4", "trainer.grad_accum=2",
           "model.sample_steps=2", *common, f"hydra.run.dir={runs['cn']}", env=env)
    export = runs["cn"] / "export"
    assert (export / "controlnet" / "config.json").exists() and (export / "pytorch_lora_weights.safetensors").exists()
    assert len((runs["cn"] / "metrics.jsonl").read_text().splitlines()) >= 4
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        runs["sd"] / "export", controlnet=ControlNetModel.from_pretrained(export / "controlnet"), safety_checker=None)
    pipe.load_lora_weights(export)
    val = FillCircles("val", count=64, val_count=8)
    images = pipe_images(pipe, [val[0]["caption"]], image=val[0]["sketch"][None])
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    Image.fromarray((val[0]["sketch"].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "s.png")
    genlab("sample", str(runs["cn"]), "--sketch", str(tmp_path / "s.png"), "--prompt", val[0]["caption"],
           "--n", "2", "--steps", "2", "--lora", f"{export}:0.5", "--out", str(tmp_path / "grid.png"), env=env)
    assert Image.open(tmp_path / "grid.png").size[0] > 32
