"""Flux.2 [klein] as a base kind: `genlab stand-in flux2-klein OUT` writes a folder that genlab reads as
"flux2-klein" and that plain diffusers' Flux2KleinPipeline samples from a prompt, offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import cli
from genlab.errors import ConfigError
from genlab.families import base_kinds, stand_ins_llm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """The tiny stand-in, written once through the CLI."""
    out = tmp_path_factory.mktemp("klein") / "base"
    done = cli("stand-in", "flux2-klein", str(out))
    assert f"model.base={out}" in done.stdout
    return out


def test_the_stand_in_is_a_klein_pipeline_folder_that_genlab_reads_as_flux2_klein(klein):
    index = json.loads((klein / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    assert {name: index[name][1] for name in ("transformer", "vae", "text_encoder", "scheduler")} == {
        "transformer": "Flux2Transformer2DModel", "vae": "AutoencoderKLFlux2", "text_encoder": "Qwen3ForCausalLM",
        "scheduler": "FlowMatchEulerDiscreteScheduler"}
    scheduler = json.loads((klein / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"] is True and scheduler["time_shift_type"] == "exponential"
    assert base_kinds.base_kind(str(klein)) == "flux2-klein"
    assert base_kinds.a_kind("flux2-klein") == "a Flux.2 [klein]"
    # No genlab family trains it yet: model=controlnet refuses it in one sentence naming the kind.
    from genlab.families.controlnet import ControlNet

    with pytest.raises(ConfigError, match=r"is a Flux\.2 \[klein\] base; .* supports"):
        ControlNet(32, base=str(klein))


def test_plain_diffusers_samples_a_prompt_with_the_pipelines_defaults(klein):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(klein)
    pipe.set_progress_bar_config(disable=True)
    # The prompt as Qwen3's chat template formats it for the pipeline (thinking off: an empty think block).
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # The default text_encoder_out_layers (9, 18, 27), stacked: 3 x the encoder's width is the transformer's input.
    embeds, text_ids = pipe.encode_prompt("a red circle", device="cpu")
    assert embeds.shape == (1, 512, 3 * pipe.text_encoder.config.hidden_size)
    assert embeds.shape[-1] == pipe.transformer.config.joint_attention_dim and text_ids.shape == (1, 512, 4)

    def sample(prompt):
        return pipe(prompt=prompt, height=32, width=32, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    red, blue = sample("a red circle"), sample("a blue square")
    assert red.shape == (1, 32, 32, 3) and np.isfinite(red).all() and 0 <= red.min() and red.max() <= 1
    assert np.abs(red - blue).max() > 1e-4  # the prompt reaches the image


def test_the_real_stand_in_has_flux2_klein_4b_sizes():
    """Built on the meta device (no memory, no weights): under a second once diffusers is imported."""
    with torch.device("meta"):
        parts = stand_ins_llm.build_flux2_klein("real")
    millions = {k: round(sum(p.numel() for p in v.parameters()) / 1e6, 1) for k, v in parts.items()}
    # The transformer of FLUX.2-klein-4B's config ("4B"), Qwen3-4B (4.0B, tied embeddings), the Flux.2 VAE.
    assert millions == {"transformer": 3875.5, "vae": 84.0, "text_encoder": 4022.5}
    text = parts["text_encoder"].config
    assert text.num_hidden_layers == 36 and text.hidden_size == 2560
    assert parts["transformer"].config.joint_attention_dim == len(stand_ins_llm.FLUX2_KLEIN_TEXT_LAYERS) * 2560
    assert parts["transformer"].config.in_channels == 4 * parts["vae"].config.latent_channels == 128
