"""The mixed-precision paths of the loop that a CPU can run: bf16 autocast, and the fp16 grad scaler's logic.

A GPU runs these for real in `make gpu-check` (tests/test_gpu.py). Here: bf16 autocast runs
on the CPU as it does on a GPU, and torch's CPU GradScaler stands in for the CUDA one
(Accelerate gives no scaler on a CPU), so the loop's scaler logic is exercised: scale the
loss, unscale before clipping, skip a step with inf gradients, lower the scale, and save
and restore the scaler's state on resume.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_DDPM, compose, toy_config
from genlab.run_dir import RunDir
from genlab.train.checkpoint import complete_checkpoints, load_file_of
from genlab.train.job import run_training
from genlab.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bf16_autocast_trains_keeps_fp32_weights_and_resumes_bitwise(tmp_path):
    def cfg(steps):
        return compose(*TINY_DDPM, "trainer.mixed_precision=bf16", f"trainer.max_steps={steps}",
                       "trainer.sample_every=0", "trainer.checkpoint_every=2", "trainer.log_every=1")

    straight = run_training(cfg(4), tmp_path / "straight")
    run_training(cfg(2), tmp_path / "resumed")
    resumed = run_training(cfg(4), tmp_path / "resumed", resume=True)
    assert torch.isfinite(torch.tensor(straight["loss"])) and straight["loss"] == resumed["loss"]
    a = load_file(complete_checkpoints(tmp_path / "straight" / "checkpoints")[-1] / "unet.safetensors")
    b = load_file(complete_checkpoints(tmp_path / "resumed" / "checkpoints")[-1] / "unet.safetensors")
    assert all(v.dtype == torch.float32 for v in a.values())  # trainable weights stay fp32 under autocast
    assert all(torch.equal(a[k], b[k]) for k in a)


def use_cpu_scaler(monkeypatch):
    """Runs get a CPU GradScaler where Accelerate would give a CUDA one for fp16 (set before `prepare`)."""
    from accelerate import Accelerator

    from genlab.train import loop

    class ScaledAccelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    monkeypatch.setattr(loop, "Accelerator", ScaledAccelerator)


def _trainer(cfg, run_dir, resume=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, RunDir(run_dir), resume=resume)


def test_fp16_scaler_skips_an_inf_step_lowers_the_scale_and_resumes(tmp_path, monkeypatch):
    """An inf gradient at the 3rd step: the scaler (not the NaN check) skips that update and halves its scale.
    Other steps update exactly as without a scaler: gradients are unscaled before clipping."""
    import shutil

    cfg = toy_config("trainer.max_steps=5", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=null",
                     "optimizer=sgd", "optimizer.nesterov=false", "trainer.lr=0.1", "trainer.grad_clip=0.01")
    cfg.model = {"_target_": "toy_family.BadAt", "image_size": 8, "channels": 1, "calls": [3], "bad": "grad"}
    reference = cfg.copy()
    reference.trainer.max_steps = 2
    run_training(reference, tmp_path / "plain")  # no scaler, no bad step yet
    use_cpu_scaler(monkeypatch)
    trainer = _trainer(cfg, tmp_path / "run")
    trainer.fit()
    assert trainer.accelerator.scaler.get_scale() == 2.0**9  # halved once, for the one inf step
    checkpoints = complete_checkpoints(tmp_path / "run" / "checkpoints")
    w2, w3, w4 = (load_file(c / "net.safetensors")["weight"] for c in checkpoints[1:4])
    assert torch.equal(w2, w3) and not torch.equal(w3, w4)  # only step 3's update was skipped
    plain = load_file(complete_checkpoints(tmp_path / "plain" / "checkpoints")[-1] / "net.safetensors")["weight"]
    torch.testing.assert_close(w2, plain, rtol=1e-6, atol=1e-7)  # clipping saw true (unscaled) gradients
    assert load_file_of(checkpoints[-1], "training_state.pt")["scaler"]["scale"] == 2.0**9
    for late in checkpoints[3:]:  # resume from step 3: the scaler's lowered scale comes back
        shutil.rmtree(late)
    again = _trainer(cfg, tmp_path / "run", resume=True)
    assert again.step == 3 and again.accelerator.scaler.get_scale() == 2.0**9
