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
from safetensors.torch import load_file
from torch.utils.data import default_collate

from conftest import cli, compose, rng
from genlab.data.fill_circles import FillCircles
from genlab.data.sketches import edges_of_image
from genlab.errors import ConfigError, GenlabError
from genlab.families import controlnet_union
from genlab.families import latent_diffusion as ld
from genlab.families.controlnet import ControlNet
from genlab.sample import load_family
from test_resume_exact import _assert_resume_is_bitwise

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


def test_union_controls_and_slots_per_sample(union_run):
    family, _ = load_family(union_run, "latest")
    union = family.controlnet
    assert isinstance(union, ControlNetUnionModel) and family.control_modes == MODES
    b = batch()
    # Each sample's control: its sketch, or the Canny edges of its image, with the slot of that control.
    seen = set()
    for step in range(3):
        images, slots = controlnet_union.training_controls(batch(4), MODES, rng(step))
        for i, slot in enumerate(slots.tolist()):
            expected = batch(4)["sketch"][i] if slot == 2 else edges_of_image((batch(4)["image"][i] + 1) / 2)
            assert torch.equal(images[i], expected)
            seen.add(slot)
    assert seen == {2, 3}  # both controls are drawn
    text = family.text_conditioning(b, b["caption"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    controls = torch.stack([b["sketch"][0], edges_of_image((b["image"][1] + 1) / 2)])

    def residuals(slots, images=controls):
        inputs = controlnet_union.union_inputs(images, torch.tensor(slots), 6, torch.float32)
        down, mid = union(latents, t, **text, **inputs, return_dict=False)
        return torch.cat([r.flatten(1) for r in (*down, mid)], dim=1)  # (B, all residuals)

    with torch.no_grad():
        # A batch of one slot: exactly what the pipeline passes (an int slot, the one-hot repeated).
        for slot in (2, 3):
            down, mid = union(latents, t, **text, controlnet_cond=[controls], control_type_idx=[slot],
                              control_type=torch.zeros(2, 6).index_fill_(1, torch.tensor([slot]), 1),
                              return_dict=False)
            assert torch.equal(residuals([slot, slot]), torch.cat([r.flatten(1) for r in (*down, mid)], dim=1))
        # Mixed slots: each sample's token carries its own slot's embedding and its one-hot row.
        tokens = {}
        hook = union.transformer_layes[0].register_forward_pre_hook(lambda m, args: tokens.update(x=args[0]))
        mixed = residuals([2, 3])
        hook.remove()
        features = union.controlnet_cond_embedding(controls).mean(dim=(2, 3))
        torch.testing.assert_close(tokens["x"][:, 0], features + union.task_embedding[[2, 3]], rtol=0, atol=1e-6)
        one_hot = controlnet_union.union_inputs(controls, torch.tensor([2, 3]), 6, torch.float32)["control_type"]
        assert one_hot.tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]]
        # The slot is read: the same images under swapped slots give other residuals.
        assert (mixed - residuals([3, 2])).abs().max() > 1e-4
        # diffusers' fusing attention runs across the batch (see controlnet_union's docstring): sample 0's
        # residuals move when only sample 1's control changes. If this fails, diffusers changed the model.
        other = residuals([2, 3], torch.stack([controls[0], 1 - controls[1]]))
        assert (mixed[0] - other[0]).abs().max() > 1e-6


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
    for bad in ("depth", 6, -1):
        with pytest.raises(GenlabError, match="--control-mode"):
            family.sample(1, seed=3, sketch=sketch, control_mode=bad)

    # `genlab sample --sketch --prompt` on the run (and --control-mode), and the card that loads it.
    Image.fromarray((sketch.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "s.png")
    for extra in ([], ["--control-mode", "edges"]):
        cli("sample", union_run, "--sketch", tmp_path / "s.png", "--prompt", caption, "--n", "2", "--steps", "2",
            "--out", tmp_path / "grid.png", *extra)
        assert Image.open(tmp_path / "grid.png").size[0] >= 64
    card = (export / "README.md").read_text()
    assert "ControlNetUnionModel.from_pretrained" in card and "StableDiffusionXLControlNetUnionPipeline" in card
    assert "control_mode=[2]" in card


@pytest.mark.slow  # ~6 s; the default suite resumes the plain SDXL ControlNet bitwise (test_sdxl_controlnet)
def test_union_resume_is_bitwise(tmp_path, sdxl_base):
    def cfg_for(steps):
        return compose(*TRAIN, f"model.base={sdxl_base}", f"trainer.max_steps={steps}", "trainer.checkpoint_every=1",
                       "model.caption_dropout=0.5")

    _assert_resume_is_bitwise(tmp_path, cfg_for, 1)


@pytest.mark.parametrize("variant", ["loha", pytest.param("dora", marks=pytest.mark.slow)])
def test_union_takes_lora_variants_on_the_base_unet(sdxl_base, tmp_path, variant):
    family = ControlNet(32, base=str(sdxl_base), controlnet=dict(union=True, control_modes=MODES),
                        lora=dict(rank=4, variant=variant))
    loss, _ = family.loss("main", batch(), 0, rng(0))
    loss.backward()
    trainable = [p for g in family.param_groups()["main"] for p in g["params"]]
    assert torch.isfinite(loss) and trainable and all(p.grad is not None for p in trainable)
    assert family.controlnet.task_embedding.grad is not None  # the union's own slot embeddings train
    family.export(tmp_path)
    assert json.loads((tmp_path / "controlnet" / "config.json").read_text())["_class_name"] == "ControlNetUnionModel"
    keys = load_file(tmp_path / "lora_kohya.safetensors")
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".hada_w1_a") for k in keys) == (variant == "loha")
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists() == (variant == "dora")


def test_union_refuses_a_base_that_is_not_sdxl_and_bad_slots(tmp_path, sdxl_base):
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ConfigError, match="union=true needs an SDXL base") as error:
        ControlNet(32, base=str(sd), controlnet=dict(union=True))
    assert str(error.value).count(". ") == 0  # one sentence
    done = cli("train", "model=controlnet", f"model.base={sd}", "model.controlnet.union=true", "data=fill_circles",
               "trainer=debug", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert done.returncode == 2 and "union=true needs an SDXL base" in done.stdout + done.stderr
    with pytest.raises(ConfigError, match="unknown control"):
        ControlNet(32, base=str(sdxl_base), controlnet=dict(union=True, control_modes={"depth": 1}))
    with pytest.raises(ConfigError, match="6 control slots"):
        ControlNet(32, base=str(sdxl_base), controlnet=dict(union=True, control_modes={"sketch": 6}))
    with pytest.raises(ConfigError, match="takes no LoRA adapters"):
        ControlNet(32, base=str(sdxl_base), controlnet=dict(union=True), control_lora=dict(rank=4))
