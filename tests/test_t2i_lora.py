"""model=lora: text-to-image LoRA on a frozen base of each kind (tiny stand-ins of SD 1.x, SDXL, SD3, Flux,
Qwen-Image and Z-Image), trained through `genlab train` with grad_accum=2 and sampled by `genlab sample --prompt`;
the adapter starts as the base (step 0 samples the base's images) and the trained one changes them; the export
loaded by the kind's plain diffusers pipeline (`load_lora_weights`) samples genlab's images, its kohya file
gives the trained weights; the prediction is the flow velocity the plain pipeline's own step takes; a resumed run
is bitwise the straight one; a base of another kind is refused in one sentence."""

from __future__ import annotations

import json
import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from huggingface_hub import ModelCard
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate

from conftest import cli, compose, rng
from genlab.data.fill_circles import FillCircles
from genlab.diffusion import flow_shift
from genlab.errors import ConfigError, GenlabError
from genlab.families import base_kinds, flux2_klein_parts
from genlab.families import latent_diffusion as ld
from genlab.families.flow_controlnet import from_pretrained, pack
from genlab.families.t2i_lora import TextToImageLoRA
from genlab.sample import load_family
from test_lora_variants import _kohya_delta
from test_resume_exact import _assert_resume_is_bitwise
from tiny_bases import tiny_sd_export

pytestmark = pytest.mark.usefixtures("one_thread")

# model.guidance as each plain pipeline takes it, written out here (not read from the family): CFG for the CLIP and
# SD3 kinds, Flux's guidance embedding, Qwen-Image's true CFG against the empty prompt, Z-Image's w - 1.
GUIDANCE = {"sd": lambda g: {"guidance_scale": g}, "sdxl": lambda g: {"guidance_scale": g},
            "sd3": lambda g: {"guidance_scale": g}, "flux": lambda g: {"guidance_scale": g},
            "qwen-image": lambda g: {"true_cfg_scale": g, "negative_prompt": [""]},
            "z-image": lambda g: {"guidance_scale": g - 1},
            "flux2-klein": lambda g: {"guidance_scale": g}}  # the stand-in is step-distilled: no CFG pass
KINDS = sorted(GUIDANCE)
UNET_KINDS = ("sd", "sdxl")
PACKED = ("flux", "qwen-image")  # the pipelines whose latents are 2x2-packed tokens


def _pipeline_latents(kind, latents):
    """The family's latents as the kind's pipeline takes its `latents` argument (Flux.2: patched maps, it packs)."""
    return latents if kind == "flux2-klein" else _layout(kind)(latents)


def _layout(kind):
    """The family's latents (B, c, h, w) in the layout the kind's pipeline takes `latents` in."""
    if kind == "flux2-klein":  # already 2x2-patched into channels: flattened to tokens
        return flux2_klein_parts.pack
    return pack if kind in PACKED else (lambda x: x)
# alpha 8 on rank 4: a scale of 2, so an export or loader that scales by 1 shows; lr high enough to move in 2 steps.
TRAIN = ["model=lora", "model.lora.rank=4", "model.lora.alpha=8", "data=fill_circles", "data.count=16", "data.val_count=4",
         "trainer=debug", "logger=none", "trainer.batch_size=2", "model.sample_steps=2",
         "trainer.keep_checkpoints=null", "trainer.lr=0.01", "model.guidance=2.0"]
PROMPT = "a red circle on a blue background"


def tokens(kind: str) -> int:
    """Prompt tokens: 16 (the pipelines' 256 / 512 would be most of a tiny step), but 128 for Qwen-Image, whose
    pipeline drops its template's first 34 tokens: the stand-in's byte-level tokenizer spends about 100 on the
    system prompt, so 16 or 64 would never reach the caption."""
    return {"qwen-image": 128, "flux2-klein": 64}.get(kind, 16)


_BASES: dict = {}  # one stand-in per kind for the whole module, whichever test asks first


def _base(kind, tmp_path_factory):
    """`genlab stand-in KIND OUT` (tiny); SD 1.x, which has no stand-in, is genlab's own tiny SD export."""
    if kind not in _BASES:
        root = tmp_path_factory.mktemp(kind)
        if kind == "sd":
            _BASES[kind] = tiny_sd_export(root)
        else:
            cli("stand-in", kind, str(root / "base"), "--size", "tiny")
            _BASES[kind] = root / "base"
    return _BASES[kind]


# The default suite runs every check on an SD and a Qwen-Image base (a U-Net and a packed flow transformer);
# `make test-slow` (CI) runs them on the other kinds too.
DEFAULT_KINDS = ("sd", "qwen-image")


@pytest.fixture(scope="module", params=[k if k in DEFAULT_KINDS else pytest.param(k, marks=pytest.mark.slow)
                                        for k in KINDS])
def base(request, tmp_path_factory):
    """(kind, base directory)."""
    return request.param, _base(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def fresh(base):
    """A model=lora family on the base as built (its adapter untrained), and the base."""
    kind, base_dir = base
    return base, TextToImageLoRA(32, base=str(base_dir), lora=dict(rank=4), max_sequence_length=tokens(kind),
                                 sample_steps=2, guidance=2.0, caption_dropout=0.0)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """2 optimizer steps of 2 micro-batches each through the real CLI; returns (kind, base, run)."""
    kind, base_dir = base
    run = tmp_path_factory.mktemp("lora") / "run"
    cli("train", *TRAIN, f"model.base={base_dir}", f"model.max_sequence_length={tokens(kind)}", "trainer.max_steps=2",
        "trainer.grad_accum=2",
        "trainer.sample_every=0", f"hydra.run.dir={run}")
    return kind, base_dir, run


@pytest.fixture(scope="module")
def loaded(trained):
    """The trained run's family, rebuilt from its latest checkpoint as `genlab sample` rebuilds it."""
    return load_family(trained[2], "latest")[0]


def _plain_pipeline(kind, base_dir):
    """The kind's plain text-to-image pipeline, as a user loads it (genlab's sampler for U-Net kinds: UniPC)."""
    pipe = from_pretrained(base_kinds.PIPELINE_CLASSES[kind], str(base_dir))  # a base without T5 passes it as None
    if kind in UNET_KINDS:
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plain(kind, pipe, guidance, seed=3):
    length = {} if kind in UNET_KINDS else {"max_sequence_length": tokens(kind)}
    return pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=2, **GUIDANCE[kind](guidance), **length,
                generator=ld.generators(1, seed), output_type="pt").images * 2 - 1


def test_trains_only_the_denoisers_lora_through_the_cli_and_samples_a_prompt(trained, loaded, tmp_path):
    kind, _, run = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    family = loaded
    denoiser = "unet" if kind in UNET_KINDS else "transformer"
    assert list(family.networks()) == [denoiser]
    trained_params = [n for n, p in family.networks()[denoiser].named_parameters() if p.requires_grad]
    assert trained_params and all("lora_" in n for n in trained_params)  # the base's own weights stay frozen
    frozen = [m for name, m in family.pipe.components.items() if isinstance(m, torch.nn.Module) and name != denoiser]
    assert frozen and not any(p.requires_grad for m in frozen for p in m.parameters())
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
    lora = load_file(checkpoint / f"{denoiser}.safetensors")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero: it trained

    cli("sample", run, "--prompt", PROMPT, "--n", "2", "--steps", "2", "--out", tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size[0] >= 2 * 32


def test_lora_starts_as_the_base(fresh):
    """At step 0 the adapter adds nothing: genlab samples the plain pipeline's images of the bare base."""
    (kind, base_dir), family = fresh
    assert any(isinstance(m, BaseTunerLayer) for m in family.denoiser.modules())
    ours = family.sample(1, seed=3, prompt=PROMPT, steps=2)
    assert torch.allclose(ours, _plain(kind, _plain_pipeline(kind, base_dir), 2.0), atol=1e-5)


def test_export_samples_genlabs_images_in_the_plain_pipeline(trained, loaded):
    kind, base_dir, run = trained
    export = run / "export"
    info = json.loads((export / "genlab_export.json").read_text())
    assert info["family"] == "lora" and info["base_kind"] == kind
    family = loaded
    ours = family.sample(1, seed=3, prompt=PROMPT, steps=2)

    pipe = _plain_pipeline(kind, base_dir)
    bare = _plain(kind, pipe, family.guidance)
    pipe.load_lora_weights(export)  # pytorch_lora_weights.safetensors, alpha from its metadata
    theirs = _plain(kind, pipe, family.guidance)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (theirs - bare).abs().max() > 1e-4  # the trained LoRA changes the base's images

    # lora_kohya.safetensors: kohya / ComfyUI's keys give the trained weights of every adapted layer.
    kohya = load_file(export / "lora_kohya.safetensors")
    prefix = "lora_unet_" if kind in UNET_KINDS else "lora_transformer_"
    layers = {n: m for n, m in family.denoiser.named_modules() if isinstance(m, BaseTunerLayer)}
    assert layers and all(k.startswith(prefix) for k in kohya)
    for name, layer in layers.items():
        weight = layer.base_layer.weight.detach()
        expected = weight + layer.get_delta_weight("default").detach()
        assert torch.allclose(_kohya_delta(kohya, prefix + name.replace(".", "_"), weight), expected, atol=1e-6)

    card = ModelCard.load(export / "README.md")
    pipeline = base_kinds.PIPELINE_CLASSES[kind]
    assert f"diffusers:{pipeline}" in card.data.tags and "lora" in card.data.tags
    assert f'{pipeline}.from_pretrained("' in card.text and "load_lora_weights(" in card.text


def test_the_prediction_is_the_velocity_of_the_plain_pipelines_step(fresh, monkeypatch):
    """The family's prediction is the velocity the plain pipeline's own forward pass gives at the training noise level
    (one Euler step to sigma 0), its target the flow velocity (x_t - x0) / sigma, both in the pipeline's layout."""
    (kind, _), family = fresh
    if kind in UNET_KINDS:
        pytest.skip("SD and SDXL bases predict noise (or v) on a DDPM schedule: no flow velocity to compare")
    monkeypatch.setattr(family, "guidance", 1.0)  # Flux's guidance embedding as the pipeline call below gives it
    loras = {n: p for n, p in family.denoiser.named_parameters() if "lora_B" in n}
    with torch.no_grad():  # an adapter far from zero, so a wrong input to the LoRA'd denoiser shows
        for i, p in enumerate(loras.values()):
            monkeypatch.setattr(p, "data", p.data + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    seen = {}
    training_inputs, predict = family.diffusion.training_inputs, family.predict

    def spy(x0, step_rng):
        seen["x0"], (seen["x_t"], seen["t"], _, _) = x0, (out := training_inputs(x0, step_rng))
        return out

    monkeypatch.setattr(family.diffusion, "training_inputs", spy)
    monkeypatch.setattr(family, "predict", lambda *a: seen.setdefault("pred", predict(*a)))
    data = FillCircles("train", image_size=32, count=4)
    batch = default_collate([data[i] for i in range(2)])
    layout = _layout(kind)
    with torch.no_grad():
        loss, _ = family.loss("main", batch, 0, rng(0))
        pipe = family.pipeline("euler")
        monkeypatch.setattr(pipe, "scheduler", FlowMatchEulerDiscreteScheduler())  # no shift: exactly the given sigma
        velocities = []
        for i, sigma in enumerate((seen["t"] / 1000).tolist()):
            start = seen["x_t"][i:i + 1]
            out = pipe(prompt=batch["caption"][i], height=32, width=32, latents=_pipeline_latents(kind, start),
                       sigmas=[sigma], num_inference_steps=1, **GUIDANCE[kind](1.0), max_sequence_length=tokens(kind),
                       output_type="latent").images
            if kind == "flux2-klein":  # its "latent" output is the VAE's, unpatched and unnormalised
                out = layout(flux2_klein_parts.normalised(pipe.vae, out))
            velocities.append((layout(start) - out) / sigma)  # x_0 = x_t - sigma v
    pred, target = seen["pred"]
    assert torch.allclose(pred, torch.cat(velocities), atol=1e-4, rtol=1e-4)
    sigma = (seen["t"] / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(target, layout((seen["x_t"] - seen["x0"]) / sigma), atol=1e-4, rtol=1e-4)
    assert torch.allclose(loss, ((pred - target) ** 2).mean(), rtol=1e-4)


def test_unet_kinds_condition_on_the_plain_pipelines_prompt_encoding(fresh):
    """SD and SDXL: the U-Net's text inputs in training are `encode_prompt`'s of the plain pipeline (SDXL: with its
    pooled embedding and the time ids of an uncropped square image at the training size)."""
    (kind, base_dir), family = fresh
    if kind not in UNET_KINDS:
        pytest.skip("the transformer kinds' prompts are their pipelines' own encode_prompt (shared with the ControlNets)")
    captions = [PROMPT, ""]
    pipe = _plain_pipeline(kind, base_dir)
    with torch.no_grad():
        ours = family.encode({"caption": captions}, captions)
        if kind == "sd":
            theirs, _ = pipe.encode_prompt(captions, "cpu", 1, False)
            assert torch.allclose(ours["encoder_hidden_states"], theirs, atol=1e-6)
            return
        text, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), text.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.allclose(ours["encoder_hidden_states"], text, atol=1e-6)
    assert torch.allclose(ours["added_cond_kwargs"]["text_embeds"], pooled, atol=1e-6)
    assert torch.equal(ours["added_cond_kwargs"]["time_ids"], time_ids.repeat(2, 1))


def test_the_training_latents_are_what_the_plain_pipeline_decodes(fresh, monkeypatch):
    """Flow kinds: the family's x0 of an image, handed to the plain pipeline as its latents (the denoiser held at zero
    velocity, so its one Euler step leaves them as they are), decodes to the VAE's own reconstruction of that image:
    the normalisation (shift, scale, Qwen-Image's per-channel mean and std) and the packing are the pipeline's."""
    from torch.utils._pytree import tree_map

    (kind, base_dir), family = fresh
    if kind in UNET_KINDS:
        pytest.skip("SD and SDXL latents are the sd family's (z * scaling_factor), no flow step to hold")
    init = DiagonalGaussianDistribution.__init__  # posterior means: no draw to match
    monkeypatch.setattr(DiagonalGaussianDistribution, "__init__", lambda self, p, deterministic=False: init(self, p, True))
    image = FillCircles("train", image_size=32, count=2)[0]["image"][None]  # (1, 3, 32, 32) in [-1, 1]
    pipe = _plain_pipeline(kind, base_dir)
    denoiser = pipe.transformer
    zero = denoiser.register_forward_hook(lambda module, args, out: tree_map(torch.zeros_like, out))
    with torch.no_grad():
        x0 = family.latents({"image": image}, rng(0))
        try:
            decoded = pipe(prompt=PROMPT, height=32, width=32, latents=_pipeline_latents(kind, x0), sigmas=[0.5],
                           num_inference_steps=1,
                           **GUIDANCE[kind](1.0), max_sequence_length=tokens(kind), output_type="pt").images
        finally:
            zero.remove()
        if kind == "qwen-image":  # a video VAE: one frame in, one frame out
            own = pipe.vae.decode(pipe.vae.encode(image.unsqueeze(2)).latent_dist.mean).sample[:, :, 0]
        else:
            own = pipe.vae.decode(pipe.vae.encode(image).latent_dist.mean).sample
    assert torch.allclose(decoded, (own / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_training_noise_levels_are_the_samplers(fresh):
    """Flow kinds: the core shifts training noise levels as the base's pipeline shifts its sampling sigmas at this
    resolution (its fixed shift, or exp(mu) from the token count)."""
    (kind, base_dir), family = fresh
    if kind in UNET_KINDS:
        pytest.skip("SD and SDXL bases train on their own DDPM schedule")
    sampler = ld.base_scheduler(str(base_dir))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sampler.config, shift_terminal=None)
    config = scheduler.config
    factor = family.vae_shape()[1]
    tokens = (32 // factor // 2) ** 2
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    if kind == "flux2-klein":  # Flux2KleinPipeline's own mu, from the tokens and the sampling steps
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        mu = compute_empirical_mu(tokens, family.sample_steps)
    u = np.linspace(1.0, 0.05, 20)
    scheduler.set_timesteps(sigmas=u, mu=mu)
    shift = math.exp(mu) if config.use_dynamic_shifting else config.shift
    assert family.diffusion.scheduler.config.shift == pytest.approx(shift)
    trained_levels = flow_shift(torch.tensor(u, dtype=torch.float32), family.diffusion.scheduler.config.shift)
    assert torch.allclose(scheduler.sigmas[:-1], trained_levels, atol=1e-6)


# SD and Z-Image in the default suite (a U-Net kind and the cheapest transformer kind); the rest run the same code.
@pytest.mark.parametrize("kind", [k if k in ("sd", "z-image") else pytest.param(k, marks=pytest.mark.slow)
                                  for k in KINDS])
def test_resume_is_bitwise(kind, tmp_path, tmp_path_factory):
    """1 step, checkpoint, resume, 1 more step == 2 straight steps, of 2 micro-batches each."""
    base_dir = _base(kind, tmp_path_factory)

    def cfg_for(steps):
        return compose(*TRAIN, f"model.base={base_dir}", f"model.max_sequence_length={tokens(kind)}",
                       f"trainer.max_steps={steps}",
                       "trainer.grad_accum=2", "trainer.checkpoint_every=1", "trainer.sample_every=0",
                       "model.caption_dropout=0.5")

    _assert_resume_is_bitwise(tmp_path, cfg_for, 1)


def test_a_base_of_another_kind_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    with pytest.raises(ConfigError) as error:
        TextToImageLoRA(32, base=str(tmp_path), lora=dict(rank=4))
    message = str(error.value)
    assert message == (f"model.base={tmp_path} is a Sana base; model=lora supports Stable Diffusion 1.x/2.x, SDXL, "
                       "SD3.x, Flux, Qwen-Image, Z-Image, Flux.2 [klein] bases.")
    done = cli("train", *TRAIN, f"model.base={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert done.returncode == 2 and "is a Sana base; model=lora supports" in done.stdout + done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert hasattr(diffusers, "SanaPipeline")  # a real pipeline class of diffusers, not a made-up name


def test_data_without_captions_is_refused_in_one_sentence(fresh):
    _, family = fresh
    with pytest.raises(GenlabError, match=r"^model=lora trains on captions and this data has none: .*\.$"):
        family.loss("main", {"image": torch.zeros(2, 3, 32, 32)}, 0, rng(0))
