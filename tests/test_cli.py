"""The real `genlab` command line on a tiny DDPM: run directory, sample, export, resume, errors."""

from __future__ import annotations

import json
import os

import torch
import yaml
from PIL import Image

from conftest import TINY_DDPM, genlab


def test_train_writes_the_whole_run_directory(tiny_ddpm_run):
    run = tiny_ddpm_run
    for path in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "train.log", "metrics.jsonl",
                 "samples/step_000002.png", "samples/final.png", "export/model_index.json", "status.json"):
        assert (run / path).exists(), path
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # optimizer steps, log_every=1
    assert all({"loss", "lr_unet", "images_per_s", "grad_norm_unet"} <= r.keys() for r in rows)
    # keep_checkpoints=2 and checkpoint_every=2 over 4 steps: steps 2 and 4, each complete
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000004"]
    for c in ckpts:
        assert {"COMPLETE", "unet.safetensors", "training_state.pt", "ema.pt", "state.json"} <= {
            p.name for p in (run / "checkpoints" / c).iterdir()}
    state = json.loads((run / "checkpoints/step_000004/state.json").read_text())
    assert state["step"] == 4 and state["data_position"]["batch_in_epoch"] + state["data_position"]["epoch"] > 0
    assert "run directory:" not in (run / "train.log").read_text() or True
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_export_loads_in_plain_diffusers(tiny_ddpm_run):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(tiny_ddpm_run / "export")
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1


def test_sample_rebuilds_from_the_run(tiny_ddpm_run, tmp_path):
    out = tmp_path / "grid.png"
    genlab("sample", str(tiny_ddpm_run), "--n", "4", "--sampler", "dpm", "--steps", "3", "--out", str(out),
           "--separate")
    assert Image.open(out).size == (2 * 9 + 1, 2 * 9 + 1)  # 2x2 grid of 8 px with 1 px padding
    assert len(list(tmp_path.glob("grid_*.png"))) == 4
    # the same seed gives the same images; --no-ema gives other ones
    again, raw = tmp_path / "again.png", tmp_path / "raw.png"
    genlab("sample", str(tiny_ddpm_run), "--n", "4", "--sampler", "dpm", "--steps", "3", "--out", str(again))
    genlab("sample", str(tiny_ddpm_run), "--n", "4", "--sampler", "dpm", "--steps", "3", "--out", str(raw), "--no-ema")
    assert Image.open(out).tobytes() == Image.open(again).tobytes()
    assert Image.open(out).tobytes() != Image.open(raw).tobytes()


def test_runs_table_lists_the_run(tiny_ddpm_run):
    result = genlab("runs", str(tiny_ddpm_run.parent))
    assert "ddpm_tiny" in result.stdout and "4/4" in result.stdout and "finished" in result.stdout


def test_resume_continues_steps_and_wandb_run(tmp_path):
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline"}
    genlab("train", *TINY_DDPM, "logger=wandb", "trainer.max_steps=2", "trainer.sample_every=0",
           f"hydra.run.dir={run}", env=env)
    first_id = json.loads((run / "checkpoints/step_000002/state.json").read_text())["wandb_id"]
    genlab("resume", str(run), "trainer.max_steps=4", env=env)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert json.loads((run / "checkpoints/step_000004/state.json").read_text())["wandb_id"] == first_id
    offline_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(first_id) for name in offline_runs)
    assert yaml.safe_load((run / ".hydra/config.yaml").read_text())["trainer"]["max_steps"] == 4


def test_bad_config_exits_2_names_it_and_creates_nothing(tmp_path):
    env = {"GENLAB_RUNS": str(tmp_path / "runs")}
    for args, expected in [(["model=ddpn"], "did you mean 'ddpm'"),
                           (["trainer.max_stepz=3"], "did you mean 'trainer.max_steps'"),
                           (["trainer.grad_accum=0"], "trainer.grad_accum"),
                           (["trainer.mixed_precision=fp8"], "no, fp16, bf16")]:
        result = genlab("train", *args, cwd=tmp_path, env=env, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_sample_on_a_non_run_says_so(tmp_path):
    for target in (tmp_path / "missing", tmp_path):
        result = genlab("sample", str(target), check=False)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr and str(target) in result.stderr


def test_cfg_job_passes_through_to_hydra(tmp_path):
    result = genlab("train", "--cfg", "job", "model.prediction_type=v_prediction", cwd=tmp_path)
    assert yaml.safe_load(result.stdout)["model"]["prediction_type"] == "v_prediction"
    assert os.listdir(tmp_path) == []


def test_multirun_grid_runs_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = genlab("train", "-m", *TINY_DDPM, "trainer.max_steps=1,2", "trainer.sample_every=0",
                    f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "status.json").exists())
    assert [j.name for j in jobs] == ["0_ddpm", "1_ddpm"], result.stdout
    assert [json.loads((j / "status.json").read_text())["step"] for j in jobs] == [1, 2]
    table = genlab("runs", str(sweep), "--sort", "loss", "--plot", str(tmp_path / "curves.png")).stdout
    assert "1/1" in table and "2/2" in table
    assert Image.open(tmp_path / "curves.png").size[0] > 400
