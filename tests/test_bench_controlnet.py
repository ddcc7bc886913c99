"""scripts/bench_controlnet.py on CPU with a tiny stand-in for SD 1.5 (the real run needs a GPU)."""

import json
from pathlib import Path

import pytest

from scripts import bench_controlnet

ROOT = Path(__file__).resolve().parents[1]


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


def test_every_base_kind_at_its_real_shapes(tmp_path):
    """--sizes: each kind's published parameter counts (meta device, no memory) and what follows from them."""
    out = tmp_path / "sizes.json"
    assert bench_controlnet.main(["--sizes", "--out", str(out)]) == 0
    sizes = json.loads(out.read_text())["sizes"]
    params = {kind: sizes[kind]["parameters_m"] for kind in sizes}
    assert params["sd15"] == {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1}
    # SDXL base 1.0: U-Net 2.6B, CLIP ViT-L 123M, OpenCLIP bigG 695M; its ControlNet copies the encoder half.
    assert params["sdxl"] == {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7}
    # SD3.5 Large: the 8.1B MMDiT, CLIP-L and bigG with projections, T5-XXL's 4.76B encoder.
    assert params["sd3"] == {"transformer": 8056.6, "vae": 83.8, "text_encoder": 123.7, "text_encoder_2": 694.7,
                             "text_encoder_3": 4762.3}
    assert params["flux"] == {"transformer": 11901.4, "vae": 83.8, "text_encoder": 123.1, "text_encoder_2": 4762.3}
    # Qwen-Image's 20.4B MMDiT and Qwen2.5-VL 7B; Z-Image's 6.2B and Qwen3 4B; Sana 1.6B, Gemma 2 2B and DC-AE.
    assert params["qwen-image"] == {"transformer": 20430.4, "vae": 126.9, "text_encoder": 8292.2}
    assert params["z-image"] == {"transformer": 6154.9, "vae": 83.8, "text_encoder": 4022.5}
    assert params["sana"] == {"transformer": 1604.5, "vae": 312.3, "text_encoder": 2614.3}
    assert sizes["sd15"]["controlnet_parameters_m"] == 361.3 and sizes["sdxl"]["controlnet_parameters_m"] == 1251.0
    assert sizes["sd15"]["lora16_parameters_m"] == 3.19  # 12.8 MB of fp32 LoRA, as docs/guide/controlnet.md's checkpoint note
    for kind in sizes:  # the int8 base is smaller; the whole-ControlNet checkpoint is 12 bytes per parameter
        assert sizes[kind]["denoiser_int8_gb"] < sizes[kind]["denoiser_bf16_gb"]
        assert sizes[kind]["denoiser_fp8_gb"] <= sizes[kind]["denoiser_int8_gb"]  # one scale per row, no zero point
        assert sizes[kind]["checkpoint_gb"]["controlnet"] == round(12 * sizes[kind]["controlnet_parameters_m"] / 1e3, 2)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantised_size_is_what_torchao_stores(tmp_path, scheme):
    """The --sizes arithmetic for a quantised denoiser against torchao quantising a tiny U-Net for real."""
    from diffusers import UNet2DConditionModel

    from genlab.families import quantize

    unet = UNet2DConditionModel(**bench_controlnet.SIZES["tiny"]["unet"])
    expected = {"int8": bench_controlnet.int8_bytes, "fp8": bench_controlnet.fp8_bytes}[scheme](unet, rest_bytes=4)
    quantize.quantize_frozen(unet, scheme)
    assert quantize.is_quantized(unet) and quantize.weight_bytes(unet) == expected


@pytest.mark.slow  # a training subprocess with a validation grid: ~30 s on 2 busy cores
def test_preset_run_measures_the_preset(tmp_path):
    """--presets: the 12 GB preset's levers (int8 base, checkpointing, 1 x 4 accumulation) reach the run.
    On the CPU: 8-bit Adam and bf16 replaced (bitsandbytes and CPU autocast around accelerate's fp32
    ControlNet outputs need a GPU)."""
    out = tmp_path / "bench.json"
    argv = ["--size", "tiny", "--image-size", "32", "--presets", "vram_12gb", "--steps", "1", "--warmup", "1",
            "--base-dir", str(tmp_path / "base"), "--out", str(out), "optimizer=adamw", "trainer.mixed_precision=no",
            "trainer.sample_n=2", "model.sample_steps=2"]
    assert bench_controlnet.main(argv) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["preset"] == "vram_12gb" and "error" not in row, row
    assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 0
    overrides = bench_controlnet.preset_overrides("vram_12gb", 2)
    assert {"trainer.quantize_base=int8", "model.gradient_checkpointing=True", "trainer.grad_accum=4",
            "trainer.sample_every=2"} <= set(overrides)
