"""`genlab sample` options reach the family: --temperature (VAE), --truncation (GAN), and eval --compare-samplers.

Runs are trained in-process (a few steps) and sampled through the real command in-process
(Typer's CliRunner): the plumbing from the command line to the family is what is tested.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import compose
from genlab.cli import app
from genlab.run_dir import RunDir
from genlab.train.job import run_training

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["trainer=debug", "logger=none", "data.image_size=8", "trainer.sample_every=0"]


def trained(root, *overrides):
    """A run directory as `genlab train` leaves it, trained in this process."""
    cfg = compose(*COMMON, *overrides)
    RunDir(root).write_config(cfg)
    run_training(cfg, root)
    return root


def sample_files(run, tmp_path, name, *options) -> list[bytes]:
    result = CliRunner().invoke(app, ["sample", str(run), "--n", "4", "--separate", "--out", str(tmp_path / f"{name}.png"),
                                      *options])
    assert result.exit_code == 0, result.output
    return [(tmp_path / f"{name}_{i:03d}.png").read_bytes() for i in range(4)]


def test_temperature_reaches_the_vae(tmp_path):
    run = trained(tmp_path / "vae", "model=vae", "model.block_out_channels=[8,8]", "model.norm_num_groups=4",
                  "model.mid_block_attention=false")
    frozen = sample_files(run, tmp_path, "t0", "--temperature", "0")
    assert len(set(frozen)) == 1  # temperature 0: every z is the prior mean
    assert len(set(sample_files(run, tmp_path, "t1", "--temperature", "1"))) == 4


def test_truncation_reaches_the_gan(tmp_path):
    run = trained(tmp_path / "gan", "model=gan", "model.g_channels=8", "model.d_channels=8", "model.latent_dim=8")
    plain, truncated = sample_files(run, tmp_path, "plain"), sample_files(run, tmp_path, "trunc", "--truncation", "0.3")
    assert truncated != plain and truncated == sample_files(run, tmp_path, "again", "--truncation", "0.3")
    result = CliRunner().invoke(app, ["sample", str(run), "--truncation", "-1"])
    assert result.exit_code == 1 and "truncation=-1" in result.output


@pytest.mark.slow  # ~19 s on a fresh clone (DDPM 1000 steps among the settings); CI runs it under -m slow
def test_eval_compare_samplers_writes_a_row_per_setting(tiny_ddpm_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_ddpm_run, run)
    result = CliRunner().invoke(app, ["eval", str(run), "--n", "4", "--compare-samplers"])
    assert result.exit_code == 0, result.output
    rows = json.loads((run / "eval" / "samplers.json").read_text())
    assert {(r["sampler"], r["steps"]) for r in rows} >= {("ddpm", 1000), ("ddim", 10), ("dpm", 10)}
    assert all(r["seconds_per_image"] > 0 and any(k.startswith("fid_") for k in r) for r in rows)
    assert Image.open(run / "eval" / "samplers.png").size[0] > 300
