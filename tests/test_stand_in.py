"""`genlab stand-in KIND OUT`: a random-weight base a user can train on before downloading the real one."""

from __future__ import annotations

import pytest

from conftest import cli


@pytest.mark.parametrize("kind, pipeline", [("sdxl", "StableDiffusionXLPipeline"), ("flux", "FluxPipeline")])
def test_a_stand_in_is_a_pipeline_folder_that_diffusers_loads(tmp_path, kind, pipeline):
    import diffusers

    out = tmp_path / kind
    done = cli("stand-in", kind, str(out))
    assert f"model.base={out}" in done.stdout
    loaded = getattr(diffusers, pipeline).from_pretrained(out)
    assert type(loaded).__name__ == pipeline
    # tiny: the architecture's block types at a few channels, so tests and demos train on it in seconds
    assert sum(p.numel() for p in loaded.components["text_encoder"].parameters()) < 5_000_000


def test_a_stand_in_never_writes_over_a_folder_and_names_the_kinds(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    refused = cli("stand-in", "sdxl", str(tmp_path / "used"), check=False)
    assert refused.returncode == 2 and "not an empty folder; nothing was written" in refused.stderr
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine" and len(list((tmp_path / "used").iterdir())) == 1
    unknown = cli("stand-in", "sd4", str(tmp_path / "new"), check=False)
    assert unknown.returncode == 2 and "choose one of sdxl, sd3, flux" in unknown.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.slow  # ~10 s each on 2 busy cores: the real configs built on the meta device (no memory, no weights)
@pytest.mark.parametrize("kind, millions", [
    ("qwen-image", {"transformer": 20430.4, "vae": 126.9, "text_encoder": 8292.2}),  # Qwen-Image, Qwen2.5-VL-7B
    ("z-image", {"transformer": 6154.9, "vae": 83.8, "text_encoder": 4022.5}),  # Z-Image-Turbo, Qwen3-4B
    ("sana", {"transformer": 1604.5, "vae": 312.3, "text_encoder": 2614.3}),  # Sana 1600M, DC-AE, Gemma-2-2B
])
def test_real_stand_ins_have_the_published_sizes(kind, millions):
    import torch

    from genlab.families import stand_ins_llm

    with torch.device("meta"):
        parts = getattr(stand_ins_llm, f"build_{kind.replace('-', '_')}")("real")
    assert {k: round(sum(p.numel() for p in v.parameters()) / 1e6, 1) for k, v in parts.items()} == millions
