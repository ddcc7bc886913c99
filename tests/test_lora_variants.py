"""model.lora.variant (lora, dora, loha, lokr through peft) on the ControlNet family's base U-Net: each
trains, and its kohya/LyCORIS export (A1111, ComfyUI) gives the trained weights back when applied with
those tools' formulas; lora and dora also reload through diffusers."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch.utils.data import default_collate

from conftest import rng
from genlab.data.fill_circles import FillCircles
from genlab.errors import ConfigError
from genlab.families import lora_variants
from genlab.families.controlnet import ControlNet
from tiny_bases import tiny_sd_export

pytestmark = pytest.mark.usefixtures("one_thread")
SUFFIXES = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
            "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
            "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
            "lokr": {"lokr_w1", "lokr_w2"}}  # the tiny layers get full Kronecker factors (no alpha: baked in)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_sd_export(tmp_path_factory.mktemp("base"))


def _trained(base, variant, steps=1, **options):
    """A model=controlnet family on `base` after `steps` AdamW steps, its denoiser under a rank-4 `variant`."""
    torch.manual_seed(0)
    family = ControlNet(32, base=str(base), lora=dict(rank=4, alpha=8, variant=variant), **options)
    params = [p for g in family.param_groups()["main"] for p in g["params"]]
    opt = torch.optim.AdamW(params, lr=1e-2)
    data = FillCircles("train", image_size=32, count=8)
    for step in range(steps):
        loss, _ = family.loss("main", default_collate([data[i] for i in range(2)]), step, rng(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return family


def _kohya_delta(tensors: dict, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The merged weight of module `name` as A1111 / ComfyUI compute it from kohya / LyCORIS keys."""
    get = lambda key: tensors.get(f"{name}.{key}")  # noqa: E731
    alpha = get("alpha")
    if get("lora_down.weight") is not None:
        down, up = get("lora_down.weight"), get("lora_up.weight")
        merged = weight + up @ down * (alpha / down.shape[0])
        if get("dora_scale") is not None:  # ComfyUI: output-axis DoRA, normalised by the base weight's rows
            merged = merged * get("dora_scale") / weight.norm(dim=1, keepdim=True)
        return merged
    if get("hada_w1_a") is not None:
        rank = get("hada_w1_b").shape[0]
        return weight + (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b")) * (alpha / rank)
    w1 = get("lokr_w1") if get("lokr_w1") is not None else get("lokr_w1_a") @ get("lokr_w1_b")
    w2 = get("lokr_w2") if get("lokr_w2") is not None else get("lokr_w2_a") @ get("lokr_w2_b")
    decomposed = get("lokr_w2_b") if get("lokr_w2_b") is not None else get("lokr_w1_b")
    scale = alpha / decomposed.shape[0] if alpha is not None and decomposed is not None else 1.0
    return weight + torch.kron(w1, w2) * scale


@pytest.mark.parametrize("variant", ["lora", "dora", "loha", "lokr"])
def test_variant_trains_and_its_kohya_export_gives_the_trained_weights(base, variant, tmp_path):
    family = _trained(base, variant)
    layers = {n: m for n, m in family.unet.named_modules() if isinstance(m, BaseTunerLayer)}
    assert len(layers) == 4 * 8  # to_q, to_k, to_v, to_out.0 of attn1 and attn2 in 4 transformer blocks (down, mid, 2 up)
    assert lora_variants.variant_of(family.unet) == variant
    family.export(tmp_path)
    kohya = load_file(tmp_path / "lora_kohya.safetensors")
    names = {k.split(".", 1)[0] for k in kohya}
    assert names == {"lora_unet_" + n.replace(".", "_") for n in layers}
    assert {k.split(".", 1)[1] for k in kohya} == SUFFIXES[variant]

    # A1111/ComfyUI's merge of the file onto the base == peft's merge of the trained adapter.
    fresh = dict(UNet2DConditionModel.from_pretrained(base, subfolder="unet").named_modules())
    moved = 0.0
    for name, layer in layers.items():
        trained = copy.deepcopy(layer)
        trained.merge()
        base_weight = fresh[name].weight.detach()
        ours = _kohya_delta(kohya, "lora_unet_" + name.replace(".", "_"), base_weight)
        assert torch.allclose(ours, trained.base_layer.weight, atol=1e-6), name
        moved = max(moved, (ours - base_weight).abs().max().item())
    assert moved > 1e-4  # one step moved the adapter off its zero start


def test_lora_and_dora_exports_sample_the_same_in_plain_diffusers(base, tmp_path):
    """The diffusers-format file (and for lora the kohya one, through diffusers' kohya loader) on the
    bare base with the exported ControlNet samples what the trained family samples."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

    from genlab.families import latent_diffusion as ld

    sketch, prompt = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), "a red circle"
    for variant in ("lora", "dora"):
        family = _trained(base, variant, steps=2)
        family.export(tmp_path / variant)
        ours = family.sample(1, seed=0, sketch=sketch, prompt=prompt, steps=2)
        files = ["pytorch_lora_weights.safetensors"] + (["lora_kohya.safetensors"] if variant == "lora" else [])
        for name in files:
            pipe = StableDiffusionControlNetPipeline.from_pretrained(
                base, controlnet=ControlNetModel.from_pretrained(tmp_path / variant / "controlnet"), safety_checker=None)
            pipe.load_lora_weights(tmp_path / variant, weight_name=name)
            pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            theirs = pipe(prompt, image=sketch[None], height=32, width=32, num_inference_steps=2, guidance_scale=family.guidance,
                          generator=ld.generators(1, 0), output_type="pt").images * 2 - 1
            assert torch.allclose(ours, theirs, atol=1e-5), (variant, name)
            pipe.unload_lora_weights()  # and without it the image differs: the adapter was read
            bare = pipe(prompt, image=sketch[None], height=32, width=32, num_inference_steps=2,
                        guidance_scale=family.guidance, generator=ld.generators(1, 0), output_type="pt").images * 2 - 1
            assert not torch.allclose(ours, bare, atol=1e-4)


def test_unknown_variant_is_one_sentence(base):
    with pytest.raises(ConfigError, match="model.lora.variant='qlora': use one of lora, dora, loha, lokr"):
        ControlNet(32, base=str(base), lora=dict(rank=4, variant="qlora"))


def test_stacked_lora_at_sample_time_takes_the_kohya_file(base, tmp_path):
    """`genlab sample --lora FILE:w` with the run's own adapter swapped out (own_lora=0) and its kohya export
    loaded in its place gives the run's own images; at weight 0 the base's."""
    family = _trained(base, "lora", steps=2)
    family.export(tmp_path)
    sketch, prompt = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), "a red circle"
    ours = family.sample(1, seed=0, sketch=sketch, prompt=prompt, steps=2)
    kohya = str(tmp_path / "lora_kohya.safetensors")
    assert torch.allclose(ours, family.sample(1, seed=0, sketch=sketch, prompt=prompt, steps=2, own_lora=0.0,
                                              lora=[f"{kohya}:1.0"]), atol=1e-5)
    bare = family.sample(1, seed=0, sketch=sketch, prompt=prompt, steps=2, own_lora=0.0)
    assert torch.allclose(bare, family.sample(1, seed=0, sketch=sketch, prompt=prompt, steps=2, own_lora=0.0,
                                              lora=[f"{kohya}:0"]), atol=1e-6)
    assert not torch.allclose(ours, bare, atol=1e-4)
