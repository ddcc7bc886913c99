"""scripts/bench_controlnet.py on CPU with a tiny stand-in for SD 1.5 (the real run needs a GPU)."""

import pytest
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_controlnet  # noqa: E402


def test_sd15_shapes_are_sd15():
    """The benchmark's base has SD 1.5's parameter counts (U-Net 860M, VAE 84M, text encoder 123M)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from genlab.text import tiny_text_config

    shapes = bench_controlnet.SIZES["sd15"]
    millions = lambda model: round(sum(p.numel() for p in model.parameters()) / 1e6)  # noqa: E731
    with torch.device("meta"):  # shapes only, no memory
        assert millions(UNet2DConditionModel(**shapes["unet"])) == 860
        assert millions(AutoencoderKL(**shapes["vae"])) == 84
        assert millions(CLIPTextModel(tiny_text_config(**shapes["text"]))) == 123


@pytest.mark.slow  # a real subprocess run of ~10-25 s; `make test-slow` (CI) runs it
def test_tiny_run_writes_every_setting(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--size", "tiny", "--image-size", "32", "--batch-sizes", "2", "--modes", "controlnet", "control_lora",
            "--checkpointing", "on", "--steps", "1", "--warmup", "1", "--base-dir", str(tmp_path / "base"),
            "--out", str(out), "trainer.mixed_precision=no", "trainer.channels_last=false"]
    assert bench_controlnet.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["size"] == "tiny" and len(report["results"]) == 2
    for row in report["results"]:
        assert "error" not in row, row
        assert row["iterations_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["gradient_checkpointing"]
    # Both modes ran on the one random base built in --base-dir.
    assert {r["mode"] for r in report["results"]} == {"controlnet", "control_lora"}
    assert (tmp_path / "base" / "model_index.json").exists()
