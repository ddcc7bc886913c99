"""The checks every flow-matching ControlNet kind with its own FlowControlNet passes (Qwen-Image, ...), on a tiny
stand-in of its base: `genlab stand-in` writes it, `genlab train model=controlnet` trains it (also with
grad_accum=2, resumed bitwise), `genlab sample` samples it, the export samples the same in the plain diffusers
ControlNet pipeline, the LoRA on the transformer loads there, the card names the base, the loss is flow matching
on what the pipeline feeds the networks and the noise levels are the sampler's.

A test file per kind (tests/test_qwen_image_controlnet.py, ...) sets `SPEC` (a `KindSpec`) and imports these
tests with `from flow_kind_checks import *`; the fixtures read the importing module's SPEC.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate

from conftest import cli, compose, rng
from genlab.data.fill_circles import FillCircles
from genlab.diffusion import flow_shift
from genlab.families import flow_controlnet
from genlab.families import latent_diffusion as ld
from genlab.families.controlnet import ControlNet
from genlab.sample import load_family
from genlab.train.checkpoint import complete_checkpoints
from test_lora_variants import _trained
from test_resume_exact import _assert_resume_is_bitwise


@dataclass(frozen=True)
class KindSpec:
    kind: str
    pipeline: str  # the text-to-image pipeline class model_index.json names
    controlnet: Any  # diffusers' ControlNet model class
    controlnet_pipeline: Any  # diffusers' ControlNet pipeline class
    family: type  # genlab's FlowControlNet subclass for the kind
    guidance: Callable[[float], dict]  # model.guidance as that pipeline's keywords, for one image
    packed: bool  # whether the pipeline's latents are 2x2-packed tokens
    zero_out: str = "controlnet_blocks."  # the ControlNet's zero-initialised outputs, by name
    # Sana: the pipeline encodes "" as a prompt differently from "" as its negative (without its instruction);
    # the empty caption trains the negative, so the check feeds the pipeline its negative prompt's encoding.
    empty_as_negative: bool = False
    train: tuple[str, ...] = ()  # extra overrides for tiny runs


def spec(request) -> KindSpec:
    return request.module.SPEC


TRAIN = ["model=controlnet", "model.lora.rank=4", "data=fill_circles", "data.count=16", "data.val_count=4",
         "trainer=debug", "logger=none", "trainer.batch_size=2", "model.sample_steps=2",
         "trainer.keep_checkpoints=null", "trainer.lr=0.01"]


@pytest.fixture(scope="module")
def base(request, tmp_path_factory):
    """`genlab stand-in KIND OUT` (tiny): a pipeline folder model_index.json names as the kind."""
    s = spec(request)
    out = tmp_path_factory.mktemp(s.kind) / "base"
    done = cli("stand-in", s.kind, str(out))
    assert f"model.base={out}" in done.stdout
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == s.pipeline
    return out


@pytest.fixture(scope="module")
def trained(request, base, tmp_path_factory):
    """3 steps through the real CLI, a validation grid at step 2."""
    run = tmp_path_factory.mktemp("cn") / "run"
    cli("train", *TRAIN, *spec(request).train, f"model.base={base}", "trainer.max_steps=3", "trainer.sample_every=2",
        "trainer.sample_n=2", f"hydra.run.dir={run}")
    return run


def _pil(sketch: torch.Tensor) -> Image.Image:
    return Image.fromarray((sketch.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _plain(s: KindSpec, pipe, sketch, caption, guidance, seed, tokens):
    torch.manual_seed(seed)
    return pipe(caption, control_image=sketch, height=32, width=32, num_inference_steps=2, **s.guidance(guidance),
                controlnet_conditioning_scale=1.0, max_sequence_length=tokens, generator=ld.generators(1, seed), output_type="pt").images * 2 - 1


def test_trains_the_controlnet_and_the_transformer_lora(request, trained, base):
    s = spec(request)
    losses = [json.loads(line)["loss"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    checkpoint = complete_checkpoints(trained / "checkpoints")[-1]
    trained_cn = load_file(checkpoint / "controlnet.safetensors")
    fresh = flow_controlnet.build_controlnet(str(base)).state_dict()
    assert isinstance(flow_controlnet.build_controlnet(str(base)), s.controlnet)
    moved = [k for k in fresh if not torch.equal(fresh[k], trained_cn[k])]
    # The zero-initialised outputs are among what moved: the sketch now reaches the base.
    assert any(s.zero_out in k for k in moved) and len(moved) > len(fresh) // 2, (len(moved), len(fresh))
    lora = load_file(checkpoint / "transformer.safetensors")
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    assert Image.open(trained / "samples" / "step_000002.png").size[0] >= 2 * 32 * 2


def test_the_controlnet_starts_as_a_copy_of_the_base_with_zero_outputs(request, base):
    """A copy of the base's first blocks (Z-Image: of the blocks it feeds, its own test), its outputs zero: the base
    unchanged at step 0."""
    s = spec(request)
    controlnet = flow_controlnet.build_controlnet(str(base))
    transformer = flow_controlnet.pipeline(str(base), controlnet).transformer
    zeros = [p for n, p in controlnet.named_parameters() if s.zero_out in n]
    assert zeros and not any(p.any() for p in zeros)
    if hasattr(controlnet, "transformer_blocks"):
        ours, theirs = controlnet.transformer_blocks[0].state_dict(), transformer.transformer_blocks[0].state_dict()
        assert ours and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_export_samples_the_same_in_plain_diffusers_and_the_card_names_the_base(request, trained, base, tmp_path):
    s = spec(request)
    export = trained / "export"
    info = json.loads((export / "genlab_export.json").read_text())
    assert info["base_kind"] == s.kind
    val = FillCircles("val", count=16, val_count=4)
    sketch, caption = _pil(val[0]["sketch"]), val[0]["caption"]
    family, _ = load_family(trained, "latest")
    assert type(family) is s.family
    ours = family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2)

    pipe = s.controlnet_pipeline.from_pretrained(base, controlnet=s.controlnet.from_pretrained(export / "controlnet"))
    pipe.set_progress_bar_config(disable=True)
    tokens = info["max_sequence_length"]
    without_lora = _plain(s, pipe, sketch, caption, family.guidance, 3, tokens)
    pipe.load_lora_weights(export)
    theirs = _plain(s, pipe, sketch, caption, family.guidance, 3, tokens)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (theirs - without_lora).abs().max() > 1e-4  # the transformer's LoRA was trained and is loaded
    off = family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2, control_scale=0.0)
    assert (ours - off).abs().max() > 1e-3  # the ControlNet steers the image

    sketch.save(tmp_path / "s.png")
    cli("sample", trained, "--sketch", tmp_path / "s.png", "--prompt", caption, "--n", "2", "--steps", "2",
        "--out", tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size[0] >= 64

    card = ModelCard.load(export / "README.md")
    assert s.kind in card.data.tags and f"diffusers:{s.controlnet_pipeline.__name__}" in card.data.tags
    assert "stable-diffusion" not in card.data.tags and "base transformer's LoRA" in card.text
    assert f"{s.controlnet.__name__}.from_pretrained(" in card.text


def test_the_loss_is_flow_matching_on_what_the_pipeline_feeds_the_networks(request, trained, monkeypatch):
    """The family's prediction is the velocity the diffusers pipeline's own forward pass gives at the training
    noise level (one Euler step to sigma 0), its target the flow velocity (x_t - x0) / sigma, both in the
    pipeline's latent layout."""
    s = spec(request)
    family, _ = load_family(trained, "latest")
    family.caption_dropout = 0.0
    with torch.no_grad():  # a ControlNet far from zero, so any difference in what it is fed shows
        for i, p in enumerate(family.controlnet.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    init = DiagonalGaussianDistribution.__init__  # posterior means: the pipeline's and the loss's draws agree
    monkeypatch.setattr(DiagonalGaussianDistribution, "__init__",
                        lambda self, p, deterministic=False: init(self, p, True))
    seen = {}
    training_inputs, flow_loss = family.diffusion.training_inputs, family.diffusion.loss

    def spy_inputs(x0, step_rng):
        seen["x0"], (seen["x_t"], seen["t"], _, _) = x0, (out := training_inputs(x0, step_rng))
        return out

    def spy_loss(pred, target, weight):
        seen["pred"], seen["target"] = pred, target
        return flow_loss(pred, target, weight)

    monkeypatch.setattr(family.diffusion, "training_inputs", spy_inputs)
    monkeypatch.setattr(family.diffusion, "loss", spy_loss)
    data = FillCircles("train", image_size=32, count=4)
    batch = default_collate([data[i] for i in range(2)])
    batch["caption"][1] = ""  # an empty caption (as dropout makes them) beside a real one: padding and its mask
    layout = flow_controlnet.pack if s.packed else (lambda x: x)
    with torch.no_grad():
        loss, _ = family.loss("main", batch, 0, rng(0))
        pipe = family.pipeline("euler")
        pipe.scheduler = FlowMatchEulerDiscreteScheduler()  # no shift: the step runs at exactly the given sigma
        velocities, targets = [], []
        for i, sigma in enumerate((seen["t"] / 1000).tolist()):
            x_t = seen["x_t"][i:i + 1]
            start = layout(x_t)
            prompt = _prompt(s, pipe, batch["caption"][i], family.text_tokens)
            out = pipe(**prompt, control_image=batch["sketch"][i:i + 1] * 2 - 1, height=32, width=32,
                       latents=start, sigmas=[sigma], num_inference_steps=1, **s.guidance(1.0),
                       controlnet_conditioning_scale=1.0,
                       max_sequence_length=family.text_tokens, output_type="latent").images
            velocities.append((start - out) / sigma)  # x_0 = x_t - sigma v
            targets.append(layout((x_t - seen["x0"][i:i + 1]) / sigma))  # noise - x0
    velocity, target = torch.cat(velocities), torch.cat(targets)
    assert torch.allclose(seen["pred"], velocity, atol=1e-4, rtol=1e-4)
    assert torch.allclose(seen["target"], target, atol=1e-4, rtol=1e-4)
    assert torch.allclose(loss, ((velocity - target) ** 2).mean(), rtol=1e-4)
    # x0 is the latent the pipeline makes of an image (its VAE, normalisation and layout): the training image,
    # given to the pipeline as its control image, reaches its ControlNet as exactly x0.
    control = _pipeline_control(pipe, batch["image"][:1], family.text_tokens, s)  # Z-Image's: one-frame (1, c, 1, h, w)
    assert torch.allclose(control.flatten(), layout(seen["x0"][:1]).flatten(), atol=1e-5)


def _prompt(s: KindSpec, pipe, caption: str, tokens: int) -> dict:
    """The pipeline's prompt keywords for `caption` (an empty one as its negative, where SPEC says)."""
    if not (caption == "" and s.empty_as_negative):
        return {"prompt": caption}
    _, _, text, mask = pipe.encode_prompt("", do_classifier_free_guidance=True, negative_prompt="",
                                          max_sequence_length=tokens)
    return {"prompt": None, "prompt_embeds": text, "prompt_attention_mask": mask}


def _pipeline_control(pipe, image: torch.Tensor, tokens: int, s: KindSpec) -> torch.Tensor:
    """What the pipeline hands its ControlNet as the control image's latents, for `image` in [-1, 1]."""
    seen = []

    def grab(module, args, kwargs):
        seen.append(kwargs["controlnet_cond"] if "controlnet_cond" in kwargs else args[3])

    hook = pipe.controlnet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe("a", control_image=image, height=32, width=32, num_inference_steps=1, **s.guidance(1.0),
             controlnet_conditioning_scale=1.0,
             max_sequence_length=tokens, output_type="latent")
    finally:
        hook.remove()
    return seen[0]


def test_training_noise_levels_are_the_samplers(request, base):
    """The core shifts training noise levels as the base's pipeline shifts its sampling sigmas at this resolution
    (its fixed shift, or its exp(mu) from the token count; a terminal stretch, where the scheduler has one, only
    rescales sampling)."""
    family = ControlNet(32, base=str(base), lora=dict(rank=0))
    assert type(family) is spec(request).family and family.diffusion.objective == "flow"
    sampler = ld.base_scheduler(str(base))
    if "flow_shift" in sampler.config:  # Sana's DPM-Solver over flow sigmas: its own spacing, shifted by flow_shift
        sampler.set_timesteps(20)
        shift = sampler.config.flow_shift
        u = 1 - np.linspace(1, 1 / sampler.config.num_train_timesteps, 21)[::-1][:-1]  # its unshifted sigmas
        assert family.diffusion.scheduler.config.shift == shift
        trained_levels = flow_shift(torch.tensor(u.copy(), dtype=torch.float32), shift)
        assert torch.allclose(sampler.sigmas[:-1].float(), trained_levels, atol=1e-6)
        return
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sampler.config, shift_terminal=None)
    config = scheduler.config
    tokens = (32 // family.vae_shape()[1] // 2) ** 2
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    u = np.linspace(1.0, 0.05, 20)
    scheduler.set_timesteps(sigmas=u, mu=mu)
    shift = math.exp(mu) if config.use_dynamic_shifting else config.shift  # resolution-dependent, or fixed
    assert family.diffusion.scheduler.config.shift == pytest.approx(shift)
    trained_levels = flow_shift(torch.tensor(u, dtype=torch.float32), family.diffusion.scheduler.config.shift)
    assert torch.allclose(scheduler.sigmas[:-1], trained_levels, atol=1e-6)


def test_controlnet_resume_is_bitwise(request, tmp_path, base):
    """1 step, checkpoint, resume, 1 more step == 2 straight steps, of 2 micro-batches each."""

    def cfg_for(steps):
        return compose(*TRAIN, *spec(request).train, f"model.base={base}", "model.lora.alpha=8",
                       f"trainer.max_steps={steps}", "trainer.grad_accum=2", "trainer.checkpoint_every=1",
                       "trainer.sample_every=0", "model.caption_dropout=0.5")

    _assert_resume_is_bitwise(tmp_path, cfg_for, 1)


@pytest.mark.slow  # the default suite checks plain LoRA's export through the CLI run above
@pytest.mark.parametrize("variant", ["dora", "loha", "lokr"])
def test_transformer_lora_variants_sample_the_same_in_plain_diffusers(request, base, variant, tmp_path):
    from peft import PeftModel

    s = spec(request)
    family = _trained(base, variant, steps=2)
    family.export(tmp_path)
    val = FillCircles("val", count=16, val_count=4)
    sketch, caption = _pil(val[0]["sketch"]), val[0]["caption"]
    ours = family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2)
    pipe = s.controlnet_pipeline.from_pretrained(base, controlnet=s.controlnet.from_pretrained(tmp_path / "controlnet"))
    pipe.set_progress_bar_config(disable=True)
    bare = _plain(s, pipe, sketch, caption, family.guidance, 3, family.text_tokens)
    if variant == "dora":
        pipe.load_lora_weights(tmp_path)
    else:
        PeftModel.from_pretrained(pipe.transformer, tmp_path / "transformer_adapter")
    assert torch.allclose(ours, _plain(s, pipe, sketch, caption, family.guidance, 3, family.text_tokens), atol=1e-5)
    assert (ours - bare).abs().max() > 1e-4


@pytest.mark.parametrize("preset", ["vram_12gb", pytest.param("vram_24gb", marks=pytest.mark.slow),
                                    pytest.param("vram_80gb", marks=pytest.mark.slow)])  # 12 GB: every lever
def test_each_memory_preset_builds_the_kind_and_trains_a_step(request, base, preset):
    """trainer=vram_12gb|24gb|80gb on this kind: the preset's levers reach its transformer and ControlNet
    (gradient checkpointing; the 12 GB preset's int8 base), and a bf16 step gives fp32 gradients to what trains."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from genlab.config import check_values
    from genlab.families import quantize

    cfg = compose("model=controlnet", "model.lora.rank=4", f"model.base={base}", f"trainer={preset}", "optimizer=adamw",
                  "data=fill_circles", "data.count=4", "data.val_count=2", *spec(request).train)
    check_values(cfg)
    checkpointing, quantized = cfg.trainer.gradient_checkpointing, cfg.trainer.quantize_base
    assert (preset == "vram_80gb") != checkpointing and (quantized == "int8") == (preset == "vram_12gb")
    family = instantiate(OmegaConf.to_container(cfg.model, resolve=True), _convert_="all")
    family.to(torch.device("cpu"), torch.bfloat16)
    assert family.transformer.is_gradient_checkpointing == family.controlnet.is_gradient_checkpointing == checkpointing
    assert quantize.is_quantized(family.transformer) == bool(quantized) and not quantize.is_quantized(family.controlnet)
    family.controlnet.train()
    data = FillCircles("train", count=4, val_count=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = family.loss("main", default_collate([data[i] for i in range(2)]), 0, rng(0))
    loss.backward()
    trainable = [p for g in family.param_groups()["main"] for p in g["params"]]
    # (An MMDiT ControlNet's last text stream feeds nothing: its weights get no gradient, with or without a preset.)
    grads = [p.grad for p in trainable if p.grad is not None]
    assert torch.isfinite(loss) and all(p.dtype == torch.float32 for p in trainable) and len(grads) > len(trainable) / 2
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
