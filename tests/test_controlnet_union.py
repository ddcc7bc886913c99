"""The SDXL union ControlNet (`model.controlnet.union=true`, diffusers' ControlNetUnionModel) on a tiny SDXL
stand-in (`genlab stand-in sdxl --size tiny`): it starts as a copy of the base encoder, trains through
`genlab train` with grad_accum=2 on two controls (the data's sketch and the image's edges, each under its
slot), resumes bitwise, samples through `genlab sample`, and its export samples the same images in
plain diffusers' StableDiffusionXLControlNetUnionPipeline."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (ControlNetModel, ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline,
                       UniPCMultistepScheduler)
from PIL import Image
from torch.utils.data import default_collate

from conftest import cli, compose, rng
from genlab.data.fill_circles import FillCircles
from genlab.data.sketches import edges_of_image
from genlab.errors import ConfigError
from genlab.families import controlnet_union
from genlab.families import latent_diffusion as ld
from genlab.families.controlnet import ControlNet
from genlab.sample import load_family
from test_resume_exact import _assert_identical, _losses, _straight_and_resumed

pytestmark = pytest.mark.usefixtures("one_thread")
MODES = {"sketch": 2, "edges": 3}
TRAIN = ["model=controlnet", "model.controlnet.union=true", "model.controlnet.control_modes={sketch:2,edges:3}",
         "model.lora.rank=4", "data=fill_circles", "data.count=16", "data.val_count=4", "trainer=debug",
         "logger=none", "trainer.batch_size=2", "trainer.grad_accum=2", "trainer.sample_every=0",
         "model.sample_steps=2", "trainer.keep_checkpoints=null", "trainer.lr=0.05"]


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("sdxl") / "base"
    cli("stand-in", "sdxl", str(base), "--size", "tiny")
    return base


@pytest.fixture(scope="module")
def union_run(sdxl_base, tmp_path_factory):
    run = tmp_path_factory.mktemp("union") / "run"
    cli("train", *TRAIN, f"model.base={sdxl_base}", "trainer.max_steps=2", f"hydra.run.dir={run}")
    return run


def batch(n=2):
    data = FillCircles("train", image_size=32, count=4)
    return default_collate([data[i] for i in range(n)])


def test_union_starts_as_a_copy_of_the_base_encoder(sdxl_base):
    family = ControlNet(32, base=str(sdxl_base), controlnet=dict(union=True, control_modes=MODES))
    union, unet = family.controlnet, family.unet
    assert isinstance(union, ControlNetUnionModel) and union.config.num_trans_channel == unet.config.block_out_channels[0]
    u, c = unet.state_dict(), union.state_dict()
    # It copies what ControlNetModel.from_unet copies (SDXL's add_embedding included), each tensor equal.
    plain = ControlNetModel.from_unet(unet).state_dict()
    copied = {k for k in plain if k in u}
    assert any(k.startswith("add_embedding.") for k in copied)
    assert copied <= set(c) and all(torch.equal(c[k], u[k]) for k in copied)
    # Its zero convolutions leave the base unchanged at step 0, whatever the control and its slot.
    b = batch()
    text = family.text_conditioning(b, b["caption"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 700])
    with torch.no_grad():
        inputs = controlnet_union.union_inputs(b["sketch"], torch.tensor([2, 3]), 6, torch.float32)
        down, mid = union(latents, t, **text, **inputs, return_dict=False)
    assert all(not r.any() for r in (*down, mid))


def test_union_slot_per_sample_is_the_pipelines_call_per_sample(union_run):
    family, _ = load_family(union_run, "latest")
    union = family.controlnet
    assert isinstance(union, ControlNetUnionModel) and family.control_modes == MODES
    b = batch()
    # Each sample's control: its sketch, or the Canny edges of its image.
    images, slots = controlnet_union.training_controls(b, MODES, rng(0))
    for i, slot in enumerate(slots.tolist()):
        expected = b["sketch"][i] if slot == 2 else edges_of_image((b["image"][i] + 1) / 2)
        assert torch.equal(images[i], expected)
    text = family.text_conditioning(b, b["caption"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    controls = torch.stack([b["sketch"][0], edges_of_image((b["image"][1] + 1) / 2)])
    with torch.no_grad():
        mixed = union(latents, t, **text, **controlnet_union.union_inputs(controls, torch.tensor([2, 3]), 6,
                                                                           torch.float32), return_dict=False)
        for i, slot in enumerate((2, 3)):  # one sample, one int slot and its one-hot: what the pipeline passes
            one = {k: v[i:i + 1] for k, v in text.items() if torch.is_tensor(v)}
            one["added_cond_kwargs"] = {k: v[i:i + 1] for k, v in text["added_cond_kwargs"].items()}
            control_type = torch.zeros(1, 6).scatter_(1, torch.tensor([[slot]]), 1)
            down, mid = union(latents[i:i + 1], t[i:i + 1], **one, controlnet_cond=[controls[i:i + 1]],
                              control_type=control_type, control_type_idx=[slot], return_dict=False)
            for ours, theirs in zip((*mixed[0], mixed[1]), (*down, mid)):
                torch.testing.assert_close(ours[i:i + 1], theirs, rtol=0, atol=1e-6)
        # The slot is read: the same image under another slot gives other residuals.
        other = union(latents, t, **text, **controlnet_union.union_inputs(controls, torch.tensor([3, 2]), 6,
                                                                           torch.float32), return_dict=False)
    assert (mixed[1] - other[1]).abs().max() > 1e-4


def test_union_export_samples_the_same_in_plain_diffusers(union_run, sdxl_base, tmp_path):
    export = union_run / "export"
    config = json.loads((export / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetUnionModel"
    assert json.loads((export / "genlab_export.json").read_text())["control_modes"] == MODES
    val = FillCircles("val", count=16, val_count=4)
    sketch, caption = val[0]["sketch"], val[0]["caption"]
    family, _ = load_family(union_run, "latest")

    pipe = StableDiffusionXLControlNetUnionPipeline.from_pretrained(
        sdxl_base, controlnet=ControlNetUnionModel.from_pretrained(export / "controlnet"))
    pipe.load_lora_weights(export)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for name, slot in MODES.items():
        images[name] = family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2, control_mode=name)
        theirs = pipe(caption, control_image=[sketch[None]], control_mode=[slot], height=32, width=32,
                      num_inference_steps=2, guidance_scale=family.guidance, generator=ld.generators(1, 3),
                      output_type="pt").images * 2 - 1
        assert torch.allclose(images[name], theirs, atol=1e-5), name
    # The default is the first control's slot; the slot changes the image; the ControlNet steers it.
    assert torch.equal(family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2), images["sketch"])
    assert (images["sketch"] - images["edges"]).abs().max() > 1e-4
    off = family.sample(1, seed=3, sketch=sketch, prompt=caption, steps=2, control_scale=0.0)
    assert (images["sketch"] - off).abs().max() > 1e-3

    # `genlab sample --sketch --prompt` on the run (and --control-mode), and the card that loads it.
    Image.fromarray((sketch.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "s.png")
    for extra in ([], ["--control-mode", "edges"]):
        cli("sample", union_run, "--sketch", tmp_path / "s.png", "--prompt", caption, "--n", "2", "--steps", "2",
            "--out", tmp_path / "grid.png", *extra)
        assert Image.open(tmp_path / "grid.png").size[0] >= 64
    card = (export / "README.md").read_text()
    assert "ControlNetUnionModel.from_pretrained" in card and "StableDiffusionXLControlNetUnionPipeline" in card
    assert "control_mode=[2]" in card


def test_union_resume_is_bitwise(tmp_path, sdxl_base):
    def cfg_for(steps):
        return compose(*TRAIN, f"model.base={sdxl_base}", f"trainer.max_steps={steps}", "trainer.checkpoint_every=1",
                       "model.caption_dropout=0.5")

    straight, resumed = _straight_and_resumed(tmp_path, cfg_for, 1)
    assert _losses(straight) == _losses(resumed)
    _assert_identical(straight, resumed)


@pytest.mark.parametrize("options", [dict(lora=dict(rank=4, variant="loha")),
                                     dict(lora=dict(rank=0), control_lora=dict(rank=4))], ids=["loha", "control_lora"])
def test_union_takes_lora_variants_and_control_lora(sdxl_base, tmp_path, options):
    family = ControlNet(32, base=str(sdxl_base), controlnet=dict(union=True, control_modes=MODES), **options)
    loss, _ = family.loss("main", batch(), 0, rng(0))
    loss.backward()
    trainable = [p for g in family.param_groups()["main"] for p in g["params"]]
    assert torch.isfinite(loss) and trainable and all(p.grad is not None for p in trainable)
    # The union's own parts (slot embeddings, fusing transformer) train under Control-LoRA too.
    assert family.controlnet.task_embedding.requires_grad and family.controlnet.task_embedding.grad is not None
    family.export(tmp_path)
    assert json.loads((tmp_path / "controlnet" / "config.json").read_text())["_class_name"] == "ControlNetUnionModel"
    if "control_lora" in options:
        assert (tmp_path / "control_lora.safetensors").exists()
    else:
        assert (tmp_path / "lora_kohya.safetensors").exists()


def test_union_refuses_a_base_that_is_not_sdxl_and_bad_slots(tmp_path, sdxl_base):
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ConfigError, match="union=true needs an SDXL base") as error:
        ControlNet(32, base=str(sd), controlnet=dict(union=True))
    assert str(error.value).count(". ") == 0  # one sentence
    with pytest.raises(ConfigError, match="unknown control"):
        ControlNet(32, base=str(sdxl_base), controlnet=dict(union=True, control_modes={"depth": 1}))
    with pytest.raises(ConfigError, match="6 control slots"):
        ControlNet(32, base=str(sdxl_base), controlnet=dict(union=True, control_modes={"sketch": 6}))
