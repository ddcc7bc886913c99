"""scripts/bench.py --mfu: the CIFAR-size model, its FLOP count, and the report (on CPU; the numbers need a GPU)."""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from scripts import bench, bench_loop

ROOT = Path(__file__).resolve().parents[1]

CIFAR = ["data.image_size=32", "data.channels=3", *bench.CIFAR_SIZE["ddpm"]]
TINY = ["model.unet.block_out_channels=[16,16,16,16]", "model.unet.norm_num_groups=8",
        "model.unet.attention_head_dim=8", "model.unet.layers_per_block=1", "trainer.batch_size=8",
        "trainer.mixed_precision=no"]


def test_cifar_size_ddpm_is_the_ddpm_papers_unet():
    family = instantiate(bench_loop.compose_config("ddpm", CIFAR).model, _convert_="all")
    assert round(sum(p.numel() for p in family.unet.parameters()) / 1e6, 1) == 35.7


def test_flops_per_image_count_forward_and_backward():
    """A training step costs about 3 forward passes (backward: gradients of inputs and of weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    train = bench.train_flops_per_image("ddpm", CIFAR, batch_size=2)
    family = instantiate(bench_loop.compose_config("ddpm", CIFAR).model, _convert_="all")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        family.unet(torch.randn(2, 3, 32, 32), torch.tensor([10, 500]))
    forward = counter.get_total_flops() / 2
    assert forward > 5e9  # about 6 GFLOPs per 32 px image for this U-Net
    assert 2.7 < train / forward < 3.3


@pytest.mark.slow  # a real subprocess run of ~10-25 s; `make test-slow` (CI) runs it
def test_mfu_mode_writes_its_section(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--mfu", "--families", "ddpm", "--mfu-compile", "off", "--steps", "2", "--warmup", "1",
                "--out", str(out), *TINY])
    mfu = json.loads(out.read_text())["mfu"]
    row = mfu["results"]["ddpm"]
    assert mfu["device"] == "cpu" and mfu["peak_bf16_tflops"] is None
    assert row["train_gflops_per_image"] > 0 and row["compile_off"]["images_per_s"] > 0
    assert row["compile_off"]["mfu"] is None and row["compile_off"]["achieved_tflops"] > 0
