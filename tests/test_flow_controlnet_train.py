"""ControlNets on SD3.x and Flux bases (tiny stand-ins) trained through `genlab train model=controlnet`:
the loss is the flow-matching one on exactly what the diffusers pipelines feed the networks, the
ControlNet and the transformer's LoRA (or DoRA, LoHa, LoKr) train, the export samples the same in plain
diffusers, and a resumed run (grad_accum=2) is bitwise the straight one."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline, SD3ControlNetModel,
                       StableDiffusion3ControlNetPipeline)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from conftest import cli, compose, flux_now_sd3_slow, rng
from genlab.data.fill_circles import FillCircles
from genlab.diffusion import flow_shift
from genlab.errors import ConfigError, GenlabError
from genlab.families import flow_controlnet, lora_variants, offload, quantize, stand_ins
from genlab.families import latent_diffusion as ld
from genlab.families.controlnet import ControlNet
from genlab.sample import load_family
from genlab.train.checkpoint import complete_checkpoints
from test_lora_variants import _kohya_delta, _trained
from test_resume_exact import _assert_resume_is_bitwise

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = {"sd3": (stand_ins.save_sd3, SD3ControlNetModel, StableDiffusion3ControlNetPipeline),
         "flux": (stand_ins.save_flux, FluxControlNetModel, FluxControlNetPipeline)}
# 16 T5 tokens (the pipelines' 256 / 512 would be most of a tiny step); lr high enough to move in 3 steps.
TRAIN = ["model=controlnet", "model.lora.rank=4", "model.max_sequence_length=16", "data=fill_circles", "data.count=16",
         "data.val_count=4", "trainer=debug", "logger=none", "trainer.batch_size=2", "model.sample_steps=2",
         "trainer.keep_checkpoints=null", "trainer.lr=0.01"]


@pytest.fixture(scope="module", params=sorted(KINDS))
def base(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, KINDS[request.param][0](root / "base", tokenizer_dir=str(root / "tok"))


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """3 steps through the real CLI, a validation grid (sketch | image) at step 2; returns (kind, base, run)."""
    kind, base_dir = base
    run = tmp_path_factory.mktemp("cn") / "run"
    cli("train", *TRAIN, f"model.base={base_dir}", "trainer.max_steps=3", "trainer.sample_every=2",
        "trainer.sample_n=2", f"hydra.run.dir={run}")
    return kind, base_dir, run


def test_trains_the_controlnet_and_the_transformer_lora_through_the_cli(trained):
    _, base_dir, run = trained
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    checkpoint = complete_checkpoints(run / "checkpoints")[-1]
    trained_cn = load_file(checkpoint / "controlnet.safetensors")
    fresh = flow_controlnet.build_controlnet(str(base_dir)).state_dict()
    moved = [k for k in fresh if not torch.equal(fresh[k], trained_cn[k])]
    # The zero-initialised outputs (and the sketch's input layer) are among what moved: the sketch now reaches the base.
    assert any(k.startswith("controlnet_blocks.") for k in moved) and len(moved) > len(fresh) // 2
    lora = load_file(checkpoint / "transformer.safetensors")
    family, _ = load_family(run, "latest")
    buffers = dict(family.transformer.named_buffers())  # checkpoints keep buffers (SD3's position table)
    assert lora and all("lora_" in k or k in buffers for k in lora)  # of the frozen transformer, only its LoRA
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero: it trained
    grid = Image.open(run / "samples" / "step_000002.png")
    assert grid.size[0] >= 2 * 32 * 2  # sketch | image pairs


def _pil(sketch: torch.Tensor) -> Image.Image:
    return Image.fromarray((sketch.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _plain(pipe, sketch, caption, guidance, seed):
    torch.manual_seed(seed)  # SD3's pipeline draws the sketch's VAE latents from the global RNG
    return pipe(caption, control_image=sketch, height=32, width=32, num_inference_steps=2, guidance_scale=guidance,
                max_sequence_length=16, generator=ld.generators(1, seed), output_type="pt").images * 2 - 1


@flux_now_sd3_slow
def test_export_samples_the_same_in_plain_diffusers(trained, tmp_path):
    kind, base_dir, run = trained
    export = run / "export"
    assert json.loads((export / "genlab_export.json").read_text())["base_kind"] == kind
    val = FillCircles("val", count=16, val_count=4)
    sketch, caption = _pil(val[0]["sketch"]), val[0]["caption"]
    family, _ = load_family(run, "latest")
    ours = family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2)

    _, controlnet_cls, pipeline_cls = KINDS[kind]
    pipe = pipeline_cls.from_pretrained(base_dir, controlnet=controlnet_cls.from_pretrained(export / "controlnet"))
    pipe.set_progress_bar_config(disable=True)
    without_lora = _plain(pipe, sketch, caption, family.guidance, 3)
    pipe.load_lora_weights(export)
    theirs = _plain(pipe, sketch, caption, family.guidance, 3)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (theirs - without_lora).abs().max() > 1e-4  # the transformer's LoRA was trained and is loaded
    off = family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2, control_scale=0.0)
    assert (ours - off).abs().max() > 1e-3  # the ControlNet steers the image

    sketch.save(tmp_path / "s.png")
    cli("sample", run, "--sketch", tmp_path / "s.png", "--prompt", caption, "--n", "2", "--steps", "2",
        "--out", tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size[0] >= 64


def test_the_model_card_names_the_flow_base(trained):
    from huggingface_hub import ModelCard

    kind, _, run = trained
    _, controlnet_cls, pipeline_cls = KINDS[kind]
    card = ModelCard.load(run / "export" / "README.md")
    assert kind in card.data.tags and f"diffusers:{pipeline_cls.__name__}" in card.data.tags
    assert "stable-diffusion" not in card.data.tags and "base transformer's LoRA" in card.text
    assert f"{controlnet_cls.__name__}.from_pretrained(" in card.text and "max_sequence_length=16)" in card.text


@flux_now_sd3_slow
def test_sample_stacks_extra_loras_on_the_transformer(trained, tmp_path):
    """`genlab sample RUN --lora PATH[:weight]` on a flow base: extra transformer adapters beside the run's own."""
    _, _, run = trained
    family, _ = load_family(run, "latest")
    export = run / "export"
    own = family.sample(1, seed=3, steps=2)
    assert torch.equal(family.sample(1, seed=3, steps=2, lora=[f"{export}:0"]), own)  # weight 0: nothing added
    doubled = family.sample(1, seed=3, steps=2, lora=[f"{export}:1"])
    assert (doubled - own).abs().max() > 1e-4  # the run's own LoRA once more: another image
    # Its own LoRA swapped out and the same file stacked instead: the same image (the file keeps alpha / rank).
    swapped = family.sample(1, seed=3, steps=2, lora=[str(export / "pytorch_lora_weights.safetensors")], own_lora=0.0)
    assert torch.allclose(swapped, own, atol=1e-5)
    assert torch.equal(family.sample(1, seed=3, steps=2), own)  # the extra adapters are gone afterwards

    (tmp_path / "bad.safetensors").write_bytes(b"not a LoRA")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # an SD U-Net layer
    unet_lora = {f"{key}.lora_A.weight": torch.ones(4, 32), f"{key}.lora_B.weight": torch.zeros(32, 4)}
    save_file(unet_lora, tmp_path / "unet.safetensors")
    for bad, says in [(tmp_path / "bad.safetensors", "cannot load it onto this base"),
                      (tmp_path / "missing.safetensors", "no such file or folder"),
                      (tmp_path / "unet.safetensors", "none of its layers is in this base's transformer")]:
        result = cli("sample", run, "--n", "1", "--steps", "2", "--out", tmp_path / "x.png", "--lora", bad, check=False)
        assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr
    assert torch.equal(family.sample(1, seed=3, steps=2), own)


def test_the_loss_is_flow_matching_on_what_the_pipeline_feeds_the_networks(trained, monkeypatch):
    """The family's prediction is the velocity the diffusers pipeline's own forward pass gives at the
    training noise level (one Euler step to sigma 0), its target the flow velocity (x_t - x0) / sigma."""
    kind, _, run = trained
    family, _ = load_family(run, "latest")
    family.caption_dropout = 0.0
    with torch.no_grad():  # a ControlNet far from zero, so any difference in what it is fed shows
        for i, p in enumerate(family.controlnet.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    # Posterior means, not samples: the pipeline's and the loss's VAE draws then agree without shared RNG.
    init = DiagonalGaussianDistribution.__init__
    monkeypatch.setattr(DiagonalGaussianDistribution, "__init__",
                        lambda self, p, deterministic=False: init(self, p, True))
    seen = {}
    training_inputs, flow_loss = family.diffusion.training_inputs, family.diffusion.loss

    def spy_inputs(x0, step_rng):
        seen["x_t"], seen["t"], _, _ = out = training_inputs(x0, step_rng)
        return out

    def spy_loss(pred, target, weight):
        seen["pred"], seen["target"] = pred, target
        return flow_loss(pred, target, weight)

    monkeypatch.setattr(family.diffusion, "training_inputs", spy_inputs)
    monkeypatch.setattr(family.diffusion, "loss", spy_loss)
    data = FillCircles("train", image_size=32, count=4)
    batch = default_collate([data[i] for i in range(2)])
    with torch.no_grad():
        loss, _ = family.loss("main", batch, 0, rng(0))
        vae = family.vae
        x0 = (vae.encode(batch["image"]).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        pipe = family.pipeline("euler")
        pipe.scheduler = FlowMatchEulerDiscreteScheduler()  # no shift: the step runs at exactly the given sigma
        velocities, targets = [], []
        for i, sigma in enumerate((seen["t"] / 1000).tolist()):
            x_t = seen["x_t"][i:i + 1]
            start = flow_controlnet.pack(x_t) if kind == "flux" else x_t
            out = pipe(batch["caption"][i], control_image=batch["sketch"][i:i + 1] * 2 - 1, height=32, width=32,
                       latents=start, sigmas=[sigma], num_inference_steps=1,
                       guidance_scale=family.guidance if kind == "flux" else 1.0,  # SD3: no CFG
                       max_sequence_length=16, output_type="latent").images
            velocities.append((start - out) / sigma)  # x_0 = x_t - sigma v
            target = (x_t - x0[i:i + 1]) / sigma  # noise - x0
            targets.append(flow_controlnet.pack(target) if kind == "flux" else target)
    velocity, target = torch.cat(velocities), torch.cat(targets)
    assert torch.allclose(seen["pred"], velocity, atol=1e-4, rtol=1e-4)
    assert torch.allclose(seen["target"], target, atol=1e-4, rtol=1e-4)
    assert torch.allclose(loss, ((velocity - target) ** 2).mean(), rtol=1e-4)


def test_training_noise_levels_are_the_samplers(base):
    """The core shifts training noise levels as the base's pipeline shifts its sampling sigmas at this resolution."""
    kind, base_dir = base
    family = ControlNet(32, base=str(base_dir), lora=dict(rank=0), max_sequence_length=16)
    pipe = family.pipeline("euler")
    u = np.linspace(1.0, 0.05, 20)
    mu = None
    if kind == "flux":  # the pipeline's mu for its token count at 32 px (FLUX.1-dev's resolution rule)
        latents, _ = pipe.prepare_latents(1, 4, 32, 32, torch.float32, "cpu", None)
        config = pipe.scheduler.config
        mu = calculate_shift(latents.shape[1], config.base_image_seq_len, config.max_image_seq_len,
                             config.base_shift, config.max_shift)
    pipe.scheduler.set_timesteps(sigmas=u, mu=mu)
    shift = family.diffusion.scheduler.config.shift
    assert shift == (3.0 if kind == "sd3" else pytest.approx(math.exp(mu)))
    trained_levels = flow_shift(torch.tensor(u, dtype=torch.float32), shift)
    assert torch.allclose(pipe.scheduler.sigmas[:-1], trained_levels, atol=1e-6)


def test_model_controlnet_dispatches_on_the_base_and_refuses_what_flow_bases_lack(base):
    kind, base_dir = base
    family = ControlNet(32, base=str(base_dir), lora=dict(rank=0))
    assert type(family) is flow_controlnet.FlowControlNet and family.kind == kind
    assert family.diffusion.objective == "flow" and set(family.networks()) == {"controlnet"}
    with pytest.raises(ConfigError, match="Control-LoRA is for SD and SDXL bases"):
        ControlNet(32, base=str(base_dir), control_lora=dict(rank=4))
    with pytest.raises(ConfigError, match="model.lora.variant='qlora': use one of lora, dora, loha, lokr."):
        ControlNet(32, base=str(base_dir), lora=dict(rank=4, variant="qlora"))
    with pytest.raises(ConfigError, match="quantised transformer .* set model.lora.variant=lora, not loha."):
        ControlNet(32, base=str(base_dir), lora=dict(rank=4, variant="loha"), quantize_base="int8")
    if kind == "flux":
        with pytest.raises(GenlabError, match="only euler takes"):
            family.sample(1, seed=0, sketch=torch.zeros(3, 32, 32), sampler="heun")


@flux_now_sd3_slow
# ~10 s a run on 2 busy cores: the default suite resumes plain LoRA on Flux, the full one every variant on both.
@pytest.mark.parametrize("variant", ["lora", *(pytest.param(v, marks=pytest.mark.slow) for v in ("dora", "loha", "lokr"))])
def test_controlnet_resume_is_bitwise(tmp_path, base, variant):
    """Each base kind (and each variant of the transformer's LoRA): 1 step, checkpoint, resume, 1 more step ==
    2 straight steps, of 2 micro-batches each."""
    _, base_dir = base

    def cfg_for(steps):
        return compose(*TRAIN, f"model.base={base_dir}", f"model.lora.variant={variant}", "model.lora.alpha=8",
                       f"trainer.max_steps={steps}", "trainer.grad_accum=2", "trainer.checkpoint_every=1",
                       "trainer.sample_every=0", "model.caption_dropout=0.5")

    _assert_resume_is_bitwise(tmp_path, cfg_for, 1)


@flux_now_sd3_slow
# lora in the default suite; the other variants (a few seconds each) under -m slow, which CI also runs.
@pytest.mark.parametrize("variant", [v if v == "lora" else pytest.param(v, marks=pytest.mark.slow)
                                     for v in lora_variants.VARIANTS])
def test_transformer_lora_variant_exports_sample_the_same_in_plain_diffusers(base, variant, tmp_path):
    """Each variant trains on the transformer; its export loaded into the plain diffusers pipeline (lora, dora:
    `load_lora_weights`; loha, lokr: peft's `PeftModel.from_pretrained`) samples genlab's images, and its
    ComfyUI file (`lora_kohya.safetensors`) gives the trained weights with ComfyUI's formulas."""
    kind, base_dir = base
    family = _trained(base_dir, variant, steps=2, max_sequence_length=16)
    assert lora_variants.variant_of(family.transformer) == variant
    family.export(tmp_path)
    val = FillCircles("val", count=16, val_count=4)
    sketch, caption = _pil(val[0]["sketch"]), val[0]["caption"]
    ours = family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2)

    _, controlnet_cls, pipeline_cls = KINDS[kind]
    pipe = pipeline_cls.from_pretrained(base_dir, controlnet=controlnet_cls.from_pretrained(tmp_path / "controlnet"))
    pipe.set_progress_bar_config(disable=True)
    bare = _plain(pipe, sketch, caption, family.guidance, 3)
    if variant in ("lora", "dora"):
        pipe.load_lora_weights(tmp_path)
    else:
        PeftModel.from_pretrained(pipe.transformer, tmp_path / "transformer_adapter")  # adapts it in place
    assert torch.allclose(ours, _plain(pipe, sketch, caption, family.guidance, 3), atol=1e-5)
    assert (ours - bare).abs().max() > 1e-4  # the adapter trained and was read

    kohya = load_file(tmp_path / "lora_kohya.safetensors")
    layers = {n: m for n, m in family.transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    assert {k.split(".", 1)[0] for k in kohya} == {"lora_transformer_" + n.replace(".", "_") for n in layers}
    for name, layer in layers.items():
        merged = copy.deepcopy(layer)
        merged.merge()
        theirs = _kohya_delta(kohya, "lora_transformer_" + name.replace(".", "_"), layer.base_layer.weight.detach())
        assert torch.allclose(theirs, merged.base_layer.weight, atol=1e-6), name
    if kind == "flux" and variant == "lora":  # diffusers' Flux loader reads this layout too
        pipe.unload_lora_weights()
        pipe.load_lora_weights(tmp_path, weight_name="lora_kohya.safetensors")
        assert torch.allclose(ours, _plain(pipe, sketch, caption, family.guidance, 3), atol=1e-5)


@pytest.mark.parametrize("options", [dict(quantize_base="int8"), dict(quantize_base="fp8"),
                                     dict(gradient_checkpointing=True)], ids=["int8", "fp8", "checkpointing"])
def test_takes_a_quantised_base_and_gradient_checkpointing(base, options):
    _, base_dir = base
    family = ControlNet(32, base=str(base_dir), lora=dict(rank=4), max_sequence_length=16, **options)
    data = FillCircles("train", image_size=32, count=4)
    loss, _ = family.loss("main", default_collate([data[i] for i in range(2)]), 0, rng(0))
    loss.backward()
    trainable = [p for g in family.param_groups()["main"] for p in g["params"]]
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert quantize.is_quantized(family.transformer) == ("quantize_base" in options)


@pytest.mark.slow  # two trainings and a few samples per base kind
@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_sample_stacks_a_plain_lora_on_a_loha_or_lokr_run(base, variant, tmp_path):
    """`--lora FILE` on a run whose own transformer adapter is LoHa/LoKr: the diffusers LoRA goes on beside it
    (weight 0 changes nothing, weight 1 changes the image) and is gone again afterwards."""
    kind, base_dir = base
    plain = _trained(base_dir, "lora", steps=2, max_sequence_length=16)
    plain.export(tmp_path / "plain")
    family = _trained(base_dir, variant, steps=2, max_sequence_length=16)
    val = FillCircles("val", count=16, val_count=4)
    conditions = dict(sketch=_pil(val[0]["sketch"]), prompt=val[0]["caption"], steps=2)
    own = family.sample(1, seed=3, **conditions)
    assert torch.equal(family.sample(1, seed=3, lora=[f"{tmp_path / 'plain'}:0"], **conditions), own)
    stacked = family.sample(1, seed=3, lora=[f"{tmp_path / 'plain'}:1"], **conditions)
    assert (stacked - own).abs().max() > 1e-3
    assert lora_variants.variant_of(family.transformer) == variant  # its own adapter is still the LoHa/LoKr
    # No layer is left wrapped in the emptied LoRA layer that stacking put around it (the next load broke on Flux).
    assert not any(isinstance(getattr(m, "base_layer", None), BaseTunerLayer) for m in family.transformer.modules())
    assert torch.equal(family.sample(1, seed=3, **conditions), own)


def test_an_offloaded_base_gives_the_same_loss_and_gradients(base):
    """model.offload_base=cpu: the frozen transformer's blocks are moved in one at a time; nothing else changes."""
    _, base_dir = base
    data = FillCircles("train", image_size=32, count=4)
    batch = default_collate([data[i] for i in range(2)])
    runs = {}
    for mode in (None, "cpu"):
        torch.manual_seed(0)
        family = ControlNet(32, base=str(base_dir), lora=dict(rank=0), max_sequence_length=16, offload_base=mode)
        family.to(torch.device("cpu"))
        loss, _ = family.loss("main", batch, 0, rng(0))
        loss.backward()
        runs[mode] = (loss.detach(), [p.grad for p in family.controlnet.parameters() if p.grad is not None], family)
    assert torch.equal(runs[None][0], runs["cpu"][0])
    assert len(runs[None][1]) == len(runs["cpu"][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(runs[None][1], runs["cpu"][1]))
    assert offload.is_offloaded(runs["cpu"][2].transformer) and not offload.is_offloaded(runs[None][2].transformer)
    with pytest.raises(ConfigError, match="would undo its LoRA's updates"):
        ControlNet(32, base=str(base_dir), lora=dict(rank=4), max_sequence_length=16, offload_base="cpu")
    with pytest.raises(ConfigError, match="use null or cpu"):
        ControlNet(32, base=str(base_dir), lora=dict(rank=0), max_sequence_length=16, offload_base="disk")
