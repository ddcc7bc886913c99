"""Test set-up: no network, no W&B servers, tiny configs, runs under a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")
# Trained feature extractors and reference statistics go to a per-session cache, not ~/.cache.
os.environ.setdefault("GENLAB_CACHE", tempfile.mkdtemp(prefix="genlab-cache-"))
# Nothing of the tests' lands in ~/.cache: Hugging Face's caches (datasets, hub) go to the session's too.
os.environ.setdefault("HF_HOME", os.path.join(os.environ["GENLAB_CACHE"], "hf"))
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(os.environ["GENLAB_CACHE"], "hf", "datasets"))

GENLAB = str(Path(sys.executable).parent / "genlab")

# PyTorch's CPU flash attention checks the real CPU for AMX/AVX-512 but its bf16 packing checks
# ATEN_CPU_CAPABILITY: with the switch set below such a CPU's level, bf16 attention raises
# "pack_vnni2 is only supported when avx512 is supported" (torch 2.14). No real CPU of that lower
# level takes this path, so the portable run (`make test-portable`) uses the math kernel instead.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    import torch

    torch.backends.cuda.enable_flash_sdp(False)  # the flag is global: it also turns off the CPU kernel

# Bitwise equality is promised only where the same operations run in the same order (a resume, a
# cold vs warm cache, 1 vs N processes as docs/reliability.md says). Two different code paths that compute the
# same thing (genlab's sampler vs a plain diffusers pipeline, a model vs its reloaded export, foreach
# vs per-tensor Adam) round differently on different CPUs: the vectorised kernels torch picks for a
# CPU (AVX-512, AVX2, none) sum in different orders. float32 has an epsilon of 1.2e-7; across kernel
# sets (ATEN_CPU_CAPABILITY default / avx2 / avx512) the tiny pipelines of these tests differ by at
# most 4.8e-7 on images in [0, 1] (measured on a Xeon with AMX). 1e-4 leaves a 200x margin for other
# CPUs and stays 10x below the smallest effect these tests look for (a ControlNet steering its image
# moves it by more than 1e-3).
ACROSS_PATHS_ATOL = 1e-4


def assert_same_up_to_rounding(actual, expected, atol: float = ACROSS_PATHS_ATOL) -> None:
    """Two code paths' float results agree to `atol` (absolute, on values of order 1)."""
    import torch

    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def assert_same_png_pixels(a: Path, b: Path) -> None:
    """Two PNG files of float images from different code paths: each pixel within one 8-bit level.

    A float difference of 1e-7 can move a value across a rounding boundary, so the files' bytes may
    differ while the images are the same.
    """
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p), dtype=np.int16) for p in (a, b))
    assert x.shape == y.shape and np.abs(x - y).max() <= 1, f"{a.name} and {b.name} differ by more than one level"


def other_cpu_capability() -> dict[str, str]:
    """An environment that makes a child process compute like another CPU (other vectorised kernels)."""
    here = os.environ.get("ATEN_CPU_CAPABILITY", "")
    return {"ATEN_CPU_CAPABILITY": "avx2" if here == "default" else "default"}


# A DDPM small enough to train a few steps in a second or two on 2 CPU cores.
TINY_DDPM = [
    "trainer=debug", "logger=none", "data.image_size=8",
    "model.unet.block_out_channels=[16,16]", "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]",
    "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]", "model.unet.attention_head_dim=8",
    "model.unet.norm_num_groups=4", "model.sample_steps=4",
]


def genlab(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `genlab` console script; returns the completed process (text output)."""
    result = subprocess.run([GENLAB, *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"genlab {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a `genlab` command in this process (Typer's CliRunner): no ~7 s import per call.

    Returns what `genlab()` returns (returncode, stdout, stderr). The real console script,
    in a process of its own, is what `genlab()` runs; keep a few tests on it.
    """
    from typer.testing import CliRunner

    from genlab.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    done = subprocess.CompletedProcess(["genlab", *args], result.exit_code, result.stdout, result.stderr)
    if check and done.returncode != 0:
        raise AssertionError(f"genlab {' '.join(map(str, args))} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks gain nothing from a second thread and lose a lot on busy cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_ddpm_run(tmp_path_factory) -> Path:
    """One tiny DDPM run through the CLI, shared by the tests that only read it.

    Trained in this process (`cli`): a process of its own would import torch and diffusers again,
    about 8 s per test worker. test_resume_continues_steps_and_wandb_run (slow) checks it bitwise
    against a run trained and resumed in processes of their own."""
    run = tmp_path_factory.mktemp("runs") / "ddpm_tiny"
    cli("train", *TINY_DDPM, f"hydra.run.dir={run}")
    return run


def rng(step: int = 0, phase: str = "main"):
    """A StepRandom for calling a family's loss by hand (each draw from it differs)."""
    from genlab.step_random import StepRandom

    return StepRandom(0, step, phase, 0)


def compose(*overrides: str):
    """train.yaml composed with `overrides` (Hydra's compose API: no run dir, no logging set-up)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from genlab.config import config_dir, hydra_args

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=hydra_args(list(overrides)))


def toy_config(*overrides: str, noise: bool = False):
    """A resolved config training tests' Toy family on 8 px digits, no tracker, no samples."""
    from omegaconf import OmegaConf

    cfg = compose("trainer=debug", "logger=none", "data.image_size=8", "trainer.sample_every=0",
                  "trainer.ema=null", "trainer.grad_clip=null", *overrides)
    cfg.model = OmegaConf.create({"_target_": "toy_family.Toy", "image_size": 8, "channels": 1, "noise": noise})
    return cfg

# The Flux/SD3 ControlNet modules check each property on Flux in the default suite; SD3 runs the same code
# through its own pipeline classes at twice the cost (three text encoders): its half waits for the slow suite,
# which CI runs too. For tests on a module's parametrised `base` fixture.
flux_now_sd3_slow = pytest.mark.parametrize("base", ["flux", pytest.param("sd3", marks=pytest.mark.slow)], indirect=True)
