"""The GPU paths: fp16 with its scaler, bf16, torch.compile, channels_last and TF32, the GPU-resident
dataset, 8-bit Adam and micro-batch probing with a real out-of-memory error.

Marked `gpu`: not in `make test`; `make gpu-check` (scripts/gpu_check.py) runs them on a CUDA
machine. Their CPU-testable logic runs in the default suite (tests/test_precision.py).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from genlab.train.checkpoint import complete_checkpoints, load_file_of
from genlab.train.job import run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = {
    "ddpm": ["model.unet.block_out_channels=[32,64]", "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]",
             "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]", "model.unet.norm_num_groups=8",
             "model.sample_steps=4"],
    "vae": ["model.block_out_channels=[32,64]", "model.norm_num_groups=8"],
    "gan": ["model.g_channels=32", "model.d_channels=32", "model.r1_gamma=1.0", "model.diffaug=[color,translation]"],
}


def config(family: str, *overrides: str):
    return compose(f"model={family}", "trainer=gpu", "logger=none", "data.image_size=16", "trainer.batch_size=32",
                   "trainer.max_steps=6", "trainer.log_every=1", "trainer.sample_every=3", "trainer.sample_n=4",
                   "trainer.checkpoint_every=3", "trainer.keep_checkpoints=null", *TINY[family], *overrides)


def losses(run) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if "loss" in k}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("family", sorted(TINY))
def test_each_family_trains_in_mixed_precision(tmp_path, family, precision):
    summary = run_training(config(family, f"trainer.mixed_precision={precision}"), tmp_path)
    assert summary["step"] == 6
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in losses(tmp_path))
    latest = complete_checkpoints(tmp_path / "checkpoints")[-1]
    scaler = load_file_of(latest, "training_state.pt")["scaler"]
    assert (scaler is not None) == (precision == "fp16")  # fp16 trains with a grad scaler, bf16 without
    for file in latest.glob("*.safetensors"):
        assert all(v.dtype != torch.float16 for v in load_file(file).values())  # trainable weights stay fp32


@pytest.mark.parametrize("family", ["ddpm", "gan"])
def test_compile_channels_last_and_tf32_train_like_the_plain_run(tmp_path, family):
    plain = run_training(config(family, "trainer.compile=false", "trainer.channels_last=false", "trainer.tf32=false",
                                "trainer.mixed_precision=no"), tmp_path / "plain")
    fast = run_training(config(family, "trainer.compile=true", "trainer.channels_last=true", "trainer.tf32=true",
                               "trainer.mixed_precision=no"), tmp_path / "fast")
    for a, b in zip(losses(tmp_path / "plain"), losses(tmp_path / "fast")):  # TF32 and kernel choice: close, not equal
        assert all(abs(a[k] - b[k]) <= 0.05 * abs(a[k]) + 1e-3 for k in a), (a, b)
    assert plain["step"] == fast["step"] == 6


def test_bf16_resume_is_bitwise_on_the_gpu(tmp_path):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def cfg(steps):
        return config("ddpm", "trainer.mixed_precision=bf16", f"trainer.max_steps={steps}", "trainer.tf32=false",
                      "data.on_device=true")  # also the GPU-resident dataset

    run_training(cfg(6), tmp_path / "straight")
    run_training(cfg(3), tmp_path / "resumed")
    run_training(cfg(6), tmp_path / "resumed", resume=True)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    a = load_file(complete_checkpoints(tmp_path / "straight" / "checkpoints")[-1] / "unet.safetensors")
    b = load_file(complete_checkpoints(tmp_path / "resumed" / "checkpoints")[-1] / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_adamw8bit_trains(tmp_path):
    summary = run_training(config("ddpm", "optimizer=adamw8bit"), tmp_path)
    assert summary["step"] == 6 and torch.isfinite(torch.tensor(summary["loss"]))


def test_micro_batch_probe_meets_a_real_out_of_memory_error(tmp_path, caplog):
    """Micro-batches of up to 1,024 digits at 256 px (~170 MB of activations each): more than the GPU holds.
    The probe meets real out-of-memory errors at the large sizes and settles on one that fits."""
    cfg = config("ddpm", "data.image_size=256", "trainer.effective_batch_size=4096", "trainer.max_steps=1",
                 "trainer.sample_every=0", "trainer.checkpoint_every=0", "trainer.mixed_precision=no")
    with caplog.at_level("INFO"):
        run_training(cfg, tmp_path)
    chosen = json.loads((complete_checkpoints(tmp_path / "checkpoints")[-1] / "state.json").read_text())
    assert chosen["batch_size"] < 1024 and chosen["batch_size"] * chosen["grad_accum"] == 4096
    assert "out of memory at 1024" in caplog.text
