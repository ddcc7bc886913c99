"""model.base: which pipeline it is, and a single-file checkpoint loaded offline like its directory."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from genlab.errors import ConfigError, GenlabError
from genlab.families import base_kinds
from genlab.families.controlnet import ControlNet
from genlab.families.sd import StableDiffusion
from ldm_single_file import sd_to_single_file
from tiny_bases import tiny_sd_export
from conftest import assert_same_up_to_rounding

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    """genlab's own tiny SD export (random weights) and the same as one LDM-layout .safetensors file."""
    root = tmp_path_factory.mktemp("base")
    tiny_sd_export(root)
    return root / "sd", sd_to_single_file(root / "sd", root / "tiny-sd.safetensors")


def test_single_file_base_loads_offline_like_its_directory(sd_export, monkeypatch):
    directory, single = sd_export
    assert base_kinds.base_kind(str(directory)) == base_kinds.base_kind(str(single)) == "sd"
    converted = base_kinds.diffusers_dir(str(single), str(directory))
    a, b = StableDiffusionPipeline.from_pretrained(directory), StableDiffusionPipeline.from_pretrained(converted)
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert a.scheduler.config == b.scheduler.config
    # Converted once: the next use reads the cached directory.
    monkeypatch.setattr(base_kinds, "_convert", lambda *a: pytest.fail("converted twice"))
    assert base_kinds.diffusers_dir(str(single), str(directory)) == converted
    # The ControlNet family on the file samples what it samples on the directory.
    images = []
    for base in (single, directory):
        torch.manual_seed(0)
        family = ControlNet(32, base=str(base), base_config=str(directory), lora=dict(rank=0))
        images.append(family.sample(1, seed=0, sketch=torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)),
                                    prompt="a red circle", steps=2))
    assert_same_up_to_rounding(images[0], images[1])  # equal weights, loaded through two paths


def test_sd_family_takes_a_single_file_base_and_refuses_other_kinds(sd_export, tmp_path):
    from genlab.families.sd import StableDiffusion

    directory, single = sd_export
    family = StableDiffusion(32, base=str(single), base_config=str(directory), vae=None, lora=dict(rank=4))
    expected = StableDiffusionPipeline.from_pretrained(directory).unet.state_dict()
    ours = {k.replace(".base_layer", ""): v for k, v in family.unet.state_dict().items() if "lora_" not in k}
    assert ours.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in ours.items())
    with pytest.raises(ConfigError, match="is an SDXL base; model=sd supports Stable Diffusion 1.x/2.x bases"):
        StableDiffusion(32, base=_pipeline_dir(tmp_path / "xl", "StableDiffusionXLPipeline"), vae=None)


def test_single_file_without_config_offline_says_what_to_set(sd_export, tmp_path, monkeypatch):
    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path))
    with pytest.raises(GenlabError, match="model.base_config"):
        base_kinds.diffusers_dir(str(sd_export[1]))


def _pipeline_dir(path, class_name):
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return str(path)


def test_kind_from_model_index_and_from_single_file_keys(tmp_path):
    for name, kind in [("StableDiffusionPipeline", "sd"), ("StableDiffusionXLPipeline", "sdxl"),
                       ("StableDiffusion3Pipeline", "sd3"), ("FluxPipeline", "flux")]:
        assert base_kinds.base_kind(_pipeline_dir(tmp_path / name, name)) == kind
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model: {}\n")  # what makes it a run (RunDir.is_run)
    _pipeline_dir(run / "export", "StableDiffusionXLPipeline")
    assert base_kinds.base_kind(str(run)) == "sdxl"  # a genlab run: its export/
    one = torch.zeros(1)
    for keys, kind in [(["conditioner.embedders.1.model.positional_embedding", "model.diffusion_model.input_blocks.0.0.weight"], "sdxl"),
                       (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "sd3"),
                       (["double_blocks.0.img_attn.norm.key_norm.scale"], "flux"),
                       (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"], "sd")]:
        save_file({k: one.clone() for k in keys}, tmp_path / f"{kind}.safetensors")
        assert base_kinds.base_kind(str(tmp_path / f"{kind}.safetensors")) == kind


def test_unknown_or_unsupported_bases_get_one_sentence(tmp_path):
    supported = r"genlab supports .*SDXL, SD3.x, Flux, Qwen-Image, Z-Image, Sana and Flux.2 \[klein\]"
    with pytest.raises(ConfigError, match=r"is a KandinskyPipeline; " + supported):
        base_kinds.base_kind(_pipeline_dir(tmp_path / "k", "KandinskyPipeline"))
    save_file({"encoder.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="first: encoder.weight.*none of the known layouts"):
        base_kinds.base_kind(str(tmp_path / "other.safetensors"))
    (tmp_path / "old.ckpt").write_bytes(b"x")
    with pytest.raises(GenlabError, match=r"\.safetensors only"):
        base_kinds.base_kind(str(tmp_path / "old.ckpt"))
    with pytest.raises(GenlabError, match="no diffusers pipeline there"):
        base_kinds.base_kind(str(tmp_path))
    sd3 = _pipeline_dir(tmp_path / "sd3", "StableDiffusion3Pipeline")
    with pytest.raises(ConfigError, match="is an SD3.x base; model=sd supports Stable Diffusion 1.x/2.x"):
        StableDiffusion(32, base=sd3)
    # model=controlnet takes SD3.x (test_flow_controlnet_train.py); a pipeline without its parts is one sentence.
    with pytest.raises(GenlabError, match="cannot load it as an SD3.x pipeline"):
        ControlNet(32, base=sd3)
