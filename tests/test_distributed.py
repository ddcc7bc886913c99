"""Two gloo processes on CPU (accelerate launch --multi_gpu): same training as one process, rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = """
from conftest import toy_config
from genlab.train.job import run_training
cfg = toy_config("trainer.max_steps=4", "trainer.batch_size={batch}", "trainer.grad_accum=2", "trainer.ema=0.9",
                 "lr_schedule=cosine", "lr_schedule.warmup_steps=1", "trainer.checkpoint_every=2")
run_training(cfg, __import__("pathlib").Path({run!r}))
"""


def _launch(tmp_path, name, processes, batch):
    run = tmp_path / name
    script = tmp_path / f"{name}.py"
    script.write_text(SCRIPT.format(batch=batch, run=str(run)))
    accelerate = str(Path(sys.executable).parent / "accelerate")
    with socket.socket() as probe:  # a free port: tests may run side by side (pytest -n)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ([accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(port),
                str(script)] if processes > 1 else [sys.executable, str(script)])
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)})
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow  # two accelerate launches (~45 s); `make test-slow` (CI) runs it with the CLI twins below
def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path):
    one = _launch(tmp_path, "one", processes=1, batch=8)
    two = _launch(tmp_path, "two", processes=2, batch=4)
    rows_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4]  # rank 0 alone writes: no line twice
    for a, b in zip(rows_one, rows_two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["lr_net"] == b["lr_net"]  # LR counts optimizer steps
    for ckpt in ("step_000002", "step_000004"):
        a = load_file(one / "checkpoints" / ckpt / "net.safetensors")
        b = load_file(two / "checkpoints" / ckpt / "net.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert (two / "export" / "net.pt").exists()


@pytest.mark.slow  # a real subprocess run of ~10-25 s; `make test-slow` (CI) runs it
def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    """hydra/launcher=local (submitit's local executor, the SLURM launcher's twin): one process per job."""
    from conftest import TINY_DDPM, genlab

    sweep = tmp_path / "sweep"
    genlab("train", "-m", "hydra/launcher=local", *TINY_DDPM, "trainer.max_steps=1,2", "trainer.sample_every=0",
           f"hydra.sweep.dir={sweep}", env={"OMP_NUM_THREADS": "1"})
    assert (sweep / ".submitit").is_dir()  # really went through submitit
    steps = [json.loads((sweep / job / "status.json").read_text())["step"] for job in ("0_ddpm", "1_ddpm")]
    assert steps == [1, 2]


@pytest.mark.slow  # a real subprocess run of ~10-25 s; `make test-slow` (CI) runs it
def test_genlab_train_processes_launches_accelerate(tmp_path):
    """`genlab train --processes 2` runs two gloo processes that share one run directory."""
    from conftest import TINY_DDPM, genlab

    run = tmp_path / "run"
    result = genlab("train", "--processes", "2", *TINY_DDPM, "trainer.max_steps=2", "trainer.sample_every=0",
                    f"hydra.run.dir={run}", env={"OMP_NUM_THREADS": "1"})
    assert "accelerate launch --multi_gpu --num_processes 2" in result.stderr
    state = json.loads((run / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["num_processes"] == 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# R3GAN's networks have no BatchNorm: on CPU processes (no SyncBatchNorm there) a BatchNorm generator
# normalises over each process's slice, and its run differs from one process's (on GPUs genlab syncs it).
TINY_GAN = ["model=gan", "model.arch=r3gan", "model.spectral_norm=false", "model.loss=rpgan", "model.r1_gamma=0.5", "trainer=debug",
            "logger=none", "data.image_size=8", "model.g_channels=8", "model.d_channels=8", "model.latent_dim=8",
            "model.diffaug=[color,translation]", "model.instance_noise=0.1"]


def _exported(run: Path) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(run)}/{k}": v for f in sorted((run / "export").rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def _assert_same_run(a: Path, b: Path) -> None:
    rows_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        for key in (k for k in ra if "loss" in k):
            assert abs(ra[key] - rb[key]) <= 1e-5 * max(1.0, abs(ra[key])), (key, ra[key], rb[key])
    wa, wb = _exported(a), _exported(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:  # the only difference left is the order of the gradient all-reduce's sums
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


# A class-conditional pixel DiT trained by flow with SD3's logit-normal noise levels (drawn for the global batch).
FLOW_DIT = ["model.objective=flow", "model.timesteps=logit_normal", "model.backbone=dit", "model.conditional=true",
            "model.dit.num_layers=1", "model.dit.num_attention_heads=2", "model.dit.attention_head_dim=8"]


# REPA on it: the digits classifier's features of each process's images, its projector trained with the DiT.
REPA = ["model.repa.encoder=digits_cnn", "model.repa.layer=1", "model.repa.projector_dim=16"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["ddpm", "gan", "ddpm_flow_dit", "ddpm_flow_dit_repa"])
def test_genlab_train_on_two_processes_is_the_run_of_one_with_the_doubled_batch(tmp_path, family):
    """Every random draw depends on (seed, step, global sample index): noise, timesteps, latents,
    augmentations, dropout of labels. So the split over processes changes nothing."""
    from conftest import TINY_DDPM, genlab

    base = {"ddpm": TINY_DDPM, "gan": TINY_GAN, "ddpm_flow_dit": [*TINY_DDPM, *FLOW_DIT],
            "ddpm_flow_dit_repa": [*TINY_DDPM, *FLOW_DIT, *REPA]}[family]
    common = [*base, "trainer.max_steps=4", "trainer.sample_every=0", "trainer.checkpoint_every=2",
              "trainer.log_every=1"]
    env = {"OMP_NUM_THREADS": "1"}
    genlab("train", *common, "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}", env=env)
    genlab("train", "--processes", "2", *common, "trainer.batch_size=4", f"hydra.run.dir={tmp_path / 'two'}", env=env)
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    # A run started on one process and resumed on two continues the same run.
    genlab("train", *[a for a in common if not a.startswith("trainer.max_steps")], "trainer.max_steps=2",
           "trainer.batch_size=8", f"hydra.run.dir={tmp_path / 'moved'}", env=env)
    genlab("resume", str(tmp_path / "moved"), "--processes", "2", "trainer.max_steps=4", "trainer.batch_size=4", env=env)
    _assert_same_run(tmp_path / "one", tmp_path / "moved")
