"""The flow chain genlab builds itself, through the CLI: VAE run -> `model=sd3` run (no T5) ->
`model=controlnet model.base=<that run>`, and the ControlNet export in plain diffusers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
from PIL import Image
from safetensors.torch import load_file

from conftest import cli
from genlab.data.fill_circles import FillCircles
from genlab.families import flow_controlnet
from genlab.families import latent_diffusion as ld
from genlab.sample import load_family
from genlab.train.checkpoint import complete_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["data=fill_circles", "data.count=16", "data.val_count=4", "trainer=debug", "logger=none",
          "trainer.batch_size=2", "trainer.sample_every=0", "trainer.checkpoint_every=2", "trainer.max_steps=2"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Three tiny runs through the CLI; returns their directories {vae, sd3, cn}."""
    root = tmp_path_factory.mktemp("chain")
    runs = {name: root / name for name in ("vae", "sd3", "cn")}
    cli("train", "model=vae", *COMMON, "model.block_out_channels=[8,8]", "model.norm_num_groups=4",
        "model.mid_block_attention=false", f"hydra.run.dir={runs['vae']}")
    cli("train", "model=sd3", *COMMON, f"model.vae={runs['vae']}", f"model.tokenizer_dir={root / 'tok'}",
        "model.mmdit.num_layers=2", "model.text_encoder.num_layers=1", "model.sample_steps=2",  # the ControlNet copies 1
        f"hydra.run.dir={runs['sd3']}")
    # No model.max_sequence_length: the family reads that the base has no T5 and uses what it was trained with.
    cli("train", "model=controlnet", *COMMON, f"model.base={runs['sd3']}", "model.lora.rank=4", "trainer.lr=0.01",
        "trainer.max_steps=3", "model.sample_steps=2", f"hydra.run.dir={runs['cn']}")
    return runs


def test_controlnet_on_an_sd3_run_trains(chain):
    run = chain["cn"]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    info = json.loads((run / "export" / "genlab_export.json").read_text())
    assert info["base_kind"] == "sd3" and info["max_sequence_length"] == 1  # the sd3 run's T5_TOKENS
    trained = load_file(complete_checkpoints(run / "checkpoints")[-1] / "controlnet.safetensors")
    fresh = flow_controlnet.build_controlnet(str(chain["sd3"])).state_dict()
    moved = [k for k in fresh if not torch.equal(fresh[k], trained[k])]
    assert any(k.startswith("controlnet_blocks.") for k in moved) and len(moved) > len(fresh) // 2


def test_the_export_samples_the_same_in_plain_diffusers(chain):
    run, base = chain["cn"], chain["sd3"] / "export"
    val = FillCircles("val", count=16, val_count=4)[0]
    sketch = Image.fromarray((val["sketch"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    family, _ = load_family(run, "latest")
    ours = family.sample(1, seed=3, sketch=sketch, prompt=val["caption"], steps=2)

    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
        base, controlnet=SD3ControlNetModel.from_pretrained(run / "export" / "controlnet"),
        text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(run / "export")
    pipe.set_progress_bar_config(disable=True)

    def plain(tokens: int) -> torch.Tensor:
        torch.manual_seed(3)  # SD3's pipeline draws the sketch's VAE latents from the global RNG
        return pipe(val["caption"], control_image=sketch, height=32, width=32, num_inference_steps=2,
                    guidance_scale=family.guidance, max_sequence_length=tokens, generator=ld.generators(1, 3),
                    output_type="pt").images * 2 - 1

    assert torch.allclose(ours, plain(1), atol=1e-5) and ours.std() > 0.05
    # The pipeline's default 256 zero T5 tokens are another input to the MMDiT: genlab must not sample with them.
    assert (ours - plain(256)).abs().max() > 1e-4
    off = family.sample(1, seed=3, sketch=sketch, prompt=val["caption"], steps=2, control_scale=0.0)
    assert (ours - off).abs().max() > 1e-3  # the ControlNet steers the image
    bare = family.sample(1, seed=3, sketch=sketch, prompt=val["caption"], steps=2, control_scale=0.0, own_lora=0.0)
    assert (off - bare).abs().max() > 1e-4  # own_lora=0: the base alone, as the quality script's ablation draws it


def test_the_model_card_loads_it_the_way_this_test_does(chain):
    text = (chain["cn"] / "export" / "README.md").read_text()
    assert "StableDiffusion3ControlNetPipeline.from_pretrained(" in text and "SD3ControlNetModel.from_pretrained(" in text
    assert "text_encoder_3=None, tokenizer_3=None" in text and "max_sequence_length=1)" in text
