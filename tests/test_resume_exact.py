"""Bitwise resume: 2N steps straight == N steps, stop, resume to 2N (weights, EMA, optimizers, RNG, data)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, toy_config
from genlab.run_dir import RunDir
from genlab.train.checkpoint import complete_checkpoints
from genlab.train.job import run_training

TINY_FAMILIES = {  # family[_variant] -> overrides giving a model that trains a step in well under a second
    "ddpm": ["model.unet.block_out_channels=[8,8]", "model.unet.down_block_types=[DownBlock2D,DownBlock2D]",
             "model.unet.up_block_types=[UpBlock2D,UpBlock2D]", "model.unet.norm_num_groups=4", "model.unet.attention_head_dim=8",
             "model.sample_steps=2"],
    "vae": ["model.block_out_channels=[8,8]", "model.norm_num_groups=4", "model.mid_block_attention=false"],
    # The diffusion core's other paths: flow matching (logit-normal timesteps, cosmap weights) and DiT.
    "ddpm_flow": ["model.objective=flow", "model.timesteps=logit_normal", "model.weighting=cosmap",
                  "model.unet.block_out_channels=[8,8]", "model.unet.down_block_types=[DownBlock2D,DownBlock2D]",
                  "model.unet.up_block_types=[UpBlock2D,UpBlock2D]", "model.unet.norm_num_groups=4", "model.unet.attention_head_dim=8",
                  "model.sample_steps=2"],
    "ddpm_dit": ["model.backbone=dit", "model.conditional=true", "model.dit.num_layers=1",
                 "model.dit.num_attention_heads=2", "model.dit.attention_head_dim=8", "model.sample_steps=2"],
    "gan": ["model.g_channels=8", "model.d_channels=8", "model.latent_dim=8", "model.n_critic=2",
            "model.r1_gamma=1.0", "model.diffaug=translation"],  # two optimizers, R1 and augmentation RNG
}


def _losses(run):
    """Every logged loss (loss, d_loss, g_loss, recon_loss, ...) of every step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if "loss" in k or k == "step"} for row in rows]


def _final_state(run):
    latest = complete_checkpoints(run / "checkpoints")[-1]
    tensors = {f"{f.stem}/{k}": v for f in latest.glob("*.safetensors") for k, v in load_file(f).items()}
    training = torch.load(latest / "training_state.pt", weights_only=True)
    ema = torch.load(latest / "ema.pt", weights_only=True) if (latest / "ema.pt").exists() else None
    return tensors, training, ema


def _assert_identical(a, b):
    ta, sa, ea = _final_state(a)
    tb, sb, eb = _final_state(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), "weights differ"
    for phase, opt in sa["optimizers"].items():
        for pid, st in opt["state"].items():
            for key, value in st.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["optimizers"][phase]["state"][pid][key])), \
                    f"optimizer {phase} state {key} differs"
    assert sa["lr_schedules"] == sb["lr_schedules"]
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    if ea is not None:
        assert all(torch.equal(x, y) for x, y in zip(ea["shadow_params"], eb["shadow_params"])), "EMA differs"


def _straight_and_resumed(tmp_path, cfg_for, n):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(cfg_for(2 * n), straight)
    run_training(cfg_for(n), resumed)
    run_training(cfg_for(2 * n), resumed, resume=True)
    return straight, resumed


def _assert_resume_is_bitwise(tmp_path, cfg_for, n):
    """n steps, checkpoint, resume to 2n == 2n straight steps: the same logged losses and final state."""
    straight, resumed = _straight_and_resumed(tmp_path, cfg_for, n)
    assert _losses(straight) == _losses(resumed)
    _assert_identical(straight, resumed)


# batch 400 of 1617 digits: 4 batches per epoch, so windows of 3 micro-batches straddle epoch ends.
@pytest.mark.parametrize("grad_accum,n", [(1, 4), (2, 2), (3, 1), (3, 2)])  # (1,4): resume at an epoch boundary
def test_toy_resume_is_bitwise(tmp_path, grad_accum, n):
    def cfg_for(steps):
        return toy_config(f"trainer.max_steps={steps}", "trainer.batch_size=400", f"trainer.grad_accum={grad_accum}",
                          "trainer.ema=0.9", f"trainer.checkpoint_every={n}", "trainer.keep_checkpoints=null",
                          noise=True)

    _assert_resume_is_bitwise(tmp_path, cfg_for, n)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_workers_and_augmentation_is_bitwise(tmp_path, num_workers):
    """A DataLoader-backed dataset (random flips) with workers: mid-epoch resume is exact."""
    from PIL import Image
    import numpy as np

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")

    def cfg_for(steps):
        cfg = toy_config(f"trainer.max_steps={steps}", "trainer.batch_size=4", "trainer.grad_accum=2", "data=imagefolder",
                         f"data.path={folder}", "data.image_size=8", f"data.num_workers={num_workers}",
                         "trainer.checkpoint_every=3", "trainer.keep_checkpoints=null", noise=True)
        cfg.model.channels = 3
        return cfg

    _assert_resume_is_bitwise(tmp_path, cfg_for, 3)


def test_negative_control_without_data_position_resume_differs(tmp_path, monkeypatch):
    """If the data position were not restored, the same comparison fails: the test has teeth."""
    from genlab.data import batches

    original = batches.BatchStream.__init__

    def forgetful(self, *args, epoch=0, batch_in_epoch=0, **kwargs):
        original(self, *args, **kwargs)  # always starts at batch 0 of epoch 0

    monkeypatch.setattr(batches.BatchStream, "__init__", forgetful)

    def cfg_for(steps):
        return toy_config(f"trainer.max_steps={steps}", "trainer.batch_size=400", "trainer.checkpoint_every=2")

    straight, resumed = _straight_and_resumed(tmp_path, cfg_for, 2)
    assert _losses(straight) != _losses(resumed)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_family_resume_is_bitwise(tmp_path, family):
    def cfg_for(steps):
        cfg = compose(f"model={family.split('_')[0]}", "trainer=debug", "logger=none", "data.image_size=8", f"trainer.max_steps={steps}",
                      "trainer.sample_every=0", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=null",
                      "trainer.grad_accum=2", *TINY_FAMILIES[family])
        return cfg

    _assert_resume_is_bitwise(tmp_path, cfg_for, 2)


def kill_config(steps: int):
    """A toy run that checkpoints at every step (keeping 2): a kill lands inside a save often."""
    cfg = toy_config(f"trainer.max_steps={steps}", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2",
                     "data.image_size=32", "trainer.batch_size=64", "trainer.log_every=1")
    cfg.model.image_size = 32
    return cfg


KILL_SCRIPT = """
from test_resume_exact import kill_config
from genlab.train.job import run_training
run_training(kill_config({steps}), __import__("pathlib").Path({run!r}))
"""


def _kill_trials(tmp_path, trials):
    """Kill -9 a run at a random moment of its stream of per-step saves, then resume it, `trials` times.

    The killed run is planned far longer than the test waits (100,000 steps), and the test checks
    that it really died of the signal: a fast machine cannot pass by finishing first.
    """
    tests = str(Path(__file__).parent)
    rng = random.Random(0)
    for trial in range(trials):
        run = tmp_path / f"trial{trial}"
        script = KILL_SCRIPT.format(steps=100_000, run=str(run))
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONPATH": tests})  # the script imports kill_config from here
        while not (run / "checkpoints").exists() and process.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere inside the stream of per-step saves
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, "the run ended before it was killed"
        latest = RunDir(run).checkpoint("latest")
        if latest is not None:  # the newest complete checkpoint always loads, with every file
            assert {"net.safetensors", "training_state.pt", "state.json", "COMPLETE"} <= {p.name for p in latest.iterdir()}
            assert all(torch.isfinite(v).all() for v in load_file(latest / "net.safetensors").values())
            torch.load(latest / "training_state.pt", weights_only=True)
        target = (json.loads((latest / "state.json").read_text())["step"] if latest else 0) + 3
        run_training(kill_config(target), run, resume=True)  # in this process: one import per trial, not two
        assert json.loads((run / "status.json").read_text())["step"] == target
        assert len(complete_checkpoints(run / "checkpoints")) == 2  # retention held through the kills


@pytest.mark.slow  # one trial (~15 s) for a quick local check; the 50 trials below are the proof
def test_kill_9_during_checkpoint_writes_quick(tmp_path):
    _kill_trials(tmp_path, trials=1)  # 50 more under -m slow


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_kill_9_during_checkpoint_writes_50_trials(tmp_path):
    _kill_trials(tmp_path, trials=50)
