"""`genlab train --plan`: the memory plan's states are what a process really holds (train/memory_plan.py).

The plan counts parameters, gradients, AdamW states and EMA from the tensors' shapes and dtypes; a
process's held bytes (memory_plan.held_bytes, DTensors' local shards) are measured at a step, after
the backward and before the optimizer step. Both are exact integer byte counts: compared equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_DDPM, cli, compose
from genlab.train import loop
from genlab.train.job import run_training
from genlab.train.memory_plan import RealSize, held_bytes, plan_config, plan_real_size, plan_states

STATES = ("params", "grads", "optimizer", "ema")
STEPS = ["trainer.max_steps=2", "trainer.log_every=1", "trainer.sample_every=0", "trainer.checkpoint_every=0",
         "trainer.ema=0.9"]


def _held_at_the_second_step(cfg, run: Path, monkeypatch) -> dict[str, int]:
    trainers, measured, calls = [], {}, [0]
    built, grad_norm = loop.Trainer.__init__, loop._grad_norm

    def keep(self, *args, **kwargs):
        built(self, *args, **kwargs)
        trainers.append(self)

    def probe(params, max_norm):  # after the backward, before the step: everything is held
        calls[0] += 1
        if calls[0] == 2:
            t = trainers[0]
            frozen = {k: v for k, v in vars(t.family).items() if isinstance(v, loop.torch.nn.Module)
                      and k not in t.family.networks()}
            measured.update(held_bytes(t.family.networks(), t.optimizers, t.ema, frozen))
        return grad_norm(params, max_norm)

    monkeypatch.setattr(loop.Trainer, "__init__", keep)
    monkeypatch.setattr(loop, "_grad_norm", probe)
    run_training(cfg, run)
    return measured


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_plan_of_one_process_is_what_it_holds(strategy, tmp_path, monkeypatch, one_thread):
    import torch.distributed as dist

    cfg = compose(*TINY_DDPM, *STEPS, f"strategy={strategy}")
    try:
        held = _held_at_the_second_step(cfg, tmp_path / "run", monkeypatch)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    planned = plan_config(compose(*TINY_DDPM, *STEPS, f"strategy={strategy}"), gpus=1)[strategy]
    assert held["ema"] and held["optimizer"] and {k: planned[k] for k in STATES} == held
    assert planned["activations"] > 0


def test_the_plan_on_two_processes_is_what_the_benchmark_measured():
    """benchmarks/fsdp-*.json holds what each of 2 gloo processes held (scripts/bench_fsdp.py, the default
    DDPM U-Net, EMA on); the plan for 2 GPUs must give the same bytes, for ddp (whole) and fsdp (shards)."""
    files = sorted((Path(__file__).parents[1] / "benchmarks").glob("fsdp-*.json"))
    assert files
    for measured in (json.loads(f.read_text()) for f in files):  # one per machine the benchmark ran on
        for name, result in measured["results"].items():
            strategy, processes = name.split("_")
            cfg = compose(*measured["overrides"], f"strategy={strategy}")
            planned = plan_config(cfg, gpus=int(processes))[strategy]
            assert {k: planned[k] for k in STATES} == result["held_bytes"], (measured["machine"], name)


def test_fsdp_divides_every_state_and_ddp_none():
    """The arithmetic on 8 GPUs: dim-0 chunks of ceil(rows / 8), the largest on rank 0."""
    import torch
    from torch import nn

    net = nn.Linear(3, 17)  # weight (17, 3), bias (17,): 3 rows of 17 on rank 0 = 9 + 3 elements
    optimized = list(net.parameters())
    ddp = plan_states({"net": net}, optimized, {}, "net", 8, "ddp")
    fsdp = plan_states({"net": net}, optimized, {}, "net", 8, "fsdp")
    assert ddp == {"params": 68 * 4, "grads": 68 * 4, "optimizer": 2 * 68 * 4, "ema": 68 * 4}
    assert fsdp == {"params": 12 * 4, "grads": 12 * 4, "optimizer": 2 * 12 * 4, "ema": 12 * 4}
    frozen = {"vae": nn.Linear(4, 16).to(torch.bfloat16)}  # 80 elements, 2 bytes each
    assert plan_states({"net": net}, optimized, frozen, None, 8, "fsdp", ("vae",))["params"] == 12 * 4 + 10 * 2
    assert plan_states({"net": net}, optimized, frozen, None, 8, "fsdp")["params"] == 12 * 4 + 80 * 2


def test_real_size_bases_are_counted_at_their_published_sizes():
    """SDXL's U-Net has 2,567M parameters and Flux.1-dev's transformer 11,902M (stand_ins.py's sources)."""
    sdxl, flux = RealSize("sdxl"), RealSize("flux", "controlnet")
    assert round(sum(p.numel() for p in sdxl.unet.parameters()) / 1e6) == 2567
    assert abs(sum(p.numel() for p in flux.transformer.parameters()) / 1e6 - 11902) < 1
    assert all(not p.requires_grad for p in flux.transformer.parameters()) and flux.networks().keys() == {"controlnet"}
    plan = plan_real_size("sdxl", "full", gpus=8, batch=1, resolution=256)
    trained = 2567e6
    assert abs(plan["ddp"]["optimizer"] - 8 * trained) / (8 * trained) < 1e-3  # two fp32 states per parameter
    assert abs(plan["fsdp"]["optimizer"] * 8 - plan["ddp"]["optimizer"]) / plan["ddp"]["optimizer"] < 1e-2
    assert 0 < plan["ddp"]["activations"] == plan["fsdp"]["activations"]


def test_genlab_train_plan_prints_the_table_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("train", "--plan", "--plan-gpus", "4", *TINY_DDPM, "trainer.ema=0.9")
    assert result.returncode == 0, result.stdout
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split()}
    assert rows["MiB"][-2:] == ["on", "4"] and set(rows) >= {"params", "grads", "optimizer", "ema", "activations"}
    assert float(rows["optimizer"][0]) > 3.9 * float(rows["optimizer"][1])  # 4 GPUs: a quarter, or a little more
    assert list(tmp_path.iterdir()) == []
    bad = cli("train", "--plan", "--plan-base", "sd9", *TINY_DDPM, check=False)
    assert bad.returncode == 2 and "sd15, sdxl, sd3, flux" in bad.stderr + bad.stdout
    no_base = cli("train", "--plan", "model=controlnet", check=False)
    assert no_base.returncode == 2 and "model.base is not set" in no_base.stderr + no_base.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # four bases of 1.6B to 20B parameters built on the meta device: ~40 s
@pytest.mark.parametrize("kind, transformer_m", [("qwen-image", 20430), ("z-image", 6155), ("sana", 1604),
                                                 ("flux2-klein", 3876)])
def test_the_2026_bases_are_counted_at_their_published_sizes_and_trained_three_ways(kind, transformer_m):
    """stand_ins_llm.py's published sizes; full fine-tuning trains the transformer, a ControlNet (not on klein:
    diffusers has none) trains only itself, and each way's forward runs through the helpers its family trains
    with (a ControlNet's activations: its own blocks' beside the frozen base's, more or fewer than full's)."""
    full = plan_real_size(kind, "full", gpus=8, batch=1, resolution=512)["ddp"]
    assert abs(full["optimizer"] / 8 / 1e6 - transformer_m) < 1  # two fp32 AdamW states per transformer weight
    assert full["activations"] > 0
    if kind == "flux2-klein":
        return
    controlnet = plan_real_size(kind, "controlnet", gpus=8, batch=1, resolution=512)["ddp"]
    assert 0 < controlnet["optimizer"] < full["optimizer"] and controlnet["activations"] > 0


@pytest.mark.slow  # the SDXL U-Net at its real size, twice: ~10 s
def test_a_lora_plan_trains_the_adapter_on_a_frozen_base_in_the_compute_dtype():
    """model=lora's plan: grads and AdamW states of the adapter alone (rank r: r * (in + out) per targeted
    Linear, counted here from the U-Net's own layers), the base held in bf16 beside its fp32 adapter."""
    from torch import nn

    lora = {"rank": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    full = RealSize("sdxl")
    targeted = [m for name, m in full.unet.named_modules() if isinstance(m, nn.Linear)
                and any(name == t or name.endswith("." + t) for t in lora["target_modules"])]
    adapter = sum(8 * (m.in_features + m.out_features) for m in targeted)
    base = sum(p.numel() for p in full.unet.parameters())
    plan = plan_real_size("sdxl", "lora", gpus=1, batch=1, resolution=256, lora=lora)["ddp"]
    frozen_rest = sum(2 * p.numel() for name, m in vars(full).items()  # bf16 VAE and text encoders
                      if isinstance(m, nn.Module) and name != "unet" for p in m.parameters())
    assert plan["grads"] == 4 * adapter and plan["optimizer"] == 8 * adapter and plan["ema"] == 0
    assert plan["params"] == frozen_rest + 2 * base + 4 * adapter  # VAE and text encoders, the U-Net in bf16
    assert plan["activations"] > 0


def test_a_controlnet_plan_on_a_base_without_one_is_refused_in_one_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("train", "--plan", "--plan-base", "flux2-klein", "model=controlnet", "model.base=x",
                 "data=fill_circles", check=False)
    assert result.returncode == 2 and "diffusers has no ControlNet of flux2-klein" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout and list(tmp_path.iterdir()) == []
