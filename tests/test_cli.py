"""The real `genlab` command line on a tiny DDPM: run directory, sample, export, resume, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY_DDPM, cli, genlab


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
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_export_loads_in_plain_diffusers_and_samples_what_genlab_samples(tiny_ddpm_run):
    """DDPMPipeline on export/ draws, for the same seed, the images genlab's own DDPM sampler draws."""
    from diffusers import DDPMPipeline

    from genlab.run_dir import load_family

    pipe = DDPMPipeline.from_pretrained(tiny_ddpm_run / "export")
    theirs = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    family, _ = load_family(tiny_ddpm_run, device="cpu")
    ours = family.sample(2, seed=7, sampler="ddpm", steps=3)  # (2, 1, 8, 8) in [-1, 1]
    assert theirs.shape == (2, 8, 8, 1) and ours.abs().max() > 0.05
    np.testing.assert_allclose((ours.permute(0, 2, 3, 1).numpy() + 1) / 2, theirs, atol=1e-5)


def test_sample_rebuilds_from_the_run(tiny_ddpm_run, tmp_path):
    out = tmp_path / "grid.png"
    genlab("sample", str(tiny_ddpm_run), "--n", "4", "--sampler", "dpm", "--steps", "3", "--out", str(out),
           "--separate")  # the real console script, once
    assert Image.open(out).size == (2 * 9 + 1, 2 * 9 + 1)  # 2x2 grid of 8 px with 1 px padding
    assert len(list(tmp_path.glob("grid_*.png"))) == 4
    # the same seed gives the same images; --no-ema gives other ones
    again, raw = tmp_path / "again.png", tmp_path / "raw.png"
    cli("sample", str(tiny_ddpm_run), "--n", "4", "--sampler", "dpm", "--steps", "3", "--out", str(again))
    cli("sample", str(tiny_ddpm_run), "--n", "4", "--sampler", "dpm", "--steps", "3", "--out", str(raw), "--no-ema")
    assert Image.open(out).tobytes() == Image.open(again).tobytes()
    assert Image.open(out).tobytes() != Image.open(raw).tobytes()


def test_runs_table_lists_the_run(tiny_ddpm_run):
    result = cli("runs", str(tiny_ddpm_run.parent))
    assert "ddpm_tiny" in result.stdout and "4/4" in result.stdout and "finished" in result.stdout


@pytest.mark.slow  # ~35 s: two processes of their own, each starting W&B's offline service
def test_resume_continues_steps_and_wandb_run(tmp_path, tiny_ddpm_run):
    """Train 2 steps, then `genlab resume` to 4 in a new process: the run of 4 straight steps, bitwise."""
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
    from safetensors.torch import load_file

    resumed, straight = run / "checkpoints/step_000004", tiny_ddpm_run / "checkpoints/step_000004"
    for name in ("unet.safetensors",):
        a, b = load_file(resumed / name), load_file(straight / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ"
    for name in ("ema.pt", "training_state.pt"):
        a, b = torch.load(resumed / name, weights_only=True), torch.load(straight / name, weights_only=True)
        flat_a = torch.cat([t.flatten().float() for t in _tensors(a)])
        flat_b = torch.cat([t.flatten().float() for t in _tensors(b)])
        assert torch.equal(flat_a, flat_b), f"{name} differs"


def _tensors(state):
    """Every tensor in a nested state (dicts, lists), in a fixed order."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


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
        result = cli("sample", str(target), check=False)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr and str(target) in result.stderr


def test_cfg_job_passes_through_to_hydra(tmp_path):
    result = genlab("train", "--cfg", "job", "model.objective=v", cwd=tmp_path)
    assert yaml.safe_load(result.stdout)["model"]["objective"] == "v"
    assert os.listdir(tmp_path) == []


def test_multirun_grid_runs_every_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = cli("train", "-m", *TINY_DDPM, "trainer.max_steps=1,2", "trainer.sample_every=0",
                 f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "status.json").exists())
    assert [j.name for j in jobs] == ["0_ddpm", "1_ddpm"], result.stdout
    assert [json.loads((j / "status.json").read_text())["step"] for j in jobs] == [1, 2]
    table = cli("runs", str(sweep), "--sort", "loss", "--plot", str(tmp_path / "curves.png")).stdout
    assert "1/1" in table and "2/2" in table
    assert curve_pixels(tmp_path / "curves.png") > 50  # the loss curves were drawn, not an empty frame


def curve_pixels(path) -> int:
    """Pixels of matplotlib's first line colours (C0 blue, C1 orange): how much curve a plot shows."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    colours = np.array([[31, 119, 180], [255, 127, 14]])
    return int((np.abs(pixels[:, None] - colours[None]).sum(-1) < 60).any(1).sum())


def _png_folder(folder, n=12, size=10):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + i % 3, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_train_on_an_image_folder_and_a_saved_hf_dataset(tmp_path):
    """data=imagefolder and data=hf through the real `genlab train` (in-process: Hydra's main, no import cost)."""
    from typer.testing import CliRunner

    from genlab.cli import app

    folder = _png_folder(tmp_path / "photos")
    import datasets

    datasets.Dataset.from_dict({"image": [Image.open(p) for p in sorted(folder.glob("*.png"))], "label": [0, 1] * 6}
                               ).save_to_disk(str(tmp_path / "hf"))
    tiny = [*TINY_DDPM, "data.channels=3", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.sample_every=0"]
    for name, data in (("folder", ["data=imagefolder", f"data.path={folder}", "data.num_workers=0"]),
                       ("hf", ["data=hf", f"data.name={tmp_path / 'hf'}", "data.label_column=label",
                               "model.conditional=true", "data.num_classes=2", "data.num_workers=0"])):
        result = CliRunner().invoke(app, ["train", *tiny, *data, f"hydra.run.dir={tmp_path / name}"])
        assert result.exit_code == 0, result.output
        assert [json.loads(line)["step"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_slurm_launcher_and_optuna_sweep_compose(tmp_path):
    """`--cfg hydra` prints what a cluster sweep would run with, submitting nothing."""
    refused = genlab("train", "-m", "--cfg", "hydra", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "cannot be combined" in refused.stderr and "Traceback" not in refused.stderr
    result = genlab("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "sweep=ddpm_optuna",
                    "--cfg", "hydra", cwd=tmp_path)
    hydra_cfg = yaml.safe_load(result.stdout)["hydra"]
    assert hydra_cfg["launcher"]["_target_"].endswith("SlurmLauncher") and hydra_cfg["launcher"]["partition"] == "gpu"
    assert hydra_cfg["launcher"]["signal_delay_s"] == 120  # the USR2 warning genlab checkpoints on
    assert hydra_cfg["sweeper"]["_target_"].endswith("OptunaSweeper") and hydra_cfg["sweeper"]["params"]
    assert os.listdir(tmp_path) == []
