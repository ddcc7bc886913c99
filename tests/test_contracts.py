"""A family and a labelled dataset built from the contracts alone get train, sample, resume and eval
(class metrics included) through the real CLI: nothing in genlab names them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import genlab
from genlab.cli import app

MODEL = """# The smallest class-conditional family: tests/minimal_family.py
_target_: minimal_family.ClassTemplates
image_size: ${data.image_size}
channels: ${data.channels}
num_classes: ${data.num_classes}
noise: 0.1
"""
DATA = """# Four classes of horizontal bands: tests/minimal_family.py
_target_: minimal_family.Stripes
image_size: 8
channels: 1
count: 256
num_classes: 4
num_workers: 0
"""


@pytest.fixture
def user_configs(tmp_path):
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "data").mkdir()
    (tmp_path / "configs" / "model" / "templates.yaml").write_text(MODEL)
    (tmp_path / "configs" / "data" / "stripes.yaml").write_text(DATA)
    return tmp_path / "configs"


@pytest.mark.slow  # ~19 s: trains, samples, resumes and evaluates through the CLI in processes of their own
def test_a_family_and_dataset_from_the_contract_alone(tmp_path, user_configs):
    run = tmp_path / "run"
    common = ["--config-dir", str(user_configs), "model=templates", "data=stripes", "trainer=debug", "logger=none",
              "trainer.lr=0.05", "trainer.batch_size=32", "trainer.log_every=2"]
    tests = str(Path(__file__).parent)  # where the user's package (minimal_family.py) lives
    genlab("train", *common, "trainer.max_steps=60", "trainer.checkpoint_every=30", f"hydra.run.dir={run}",
           env={"OMP_NUM_THREADS": "1", "PYTHONPATH": tests})
    runner = CliRunner()
    # The run's config names a class outside genlab: loading it is refused until the user trusts it.
    refused = runner.invoke(app, ["sample", str(run), "--n", "8"])
    assert refused.exit_code == 2 and "--allow-target minimal_family" in refused.output
    trust = ["--allow-target", "minimal_family"]
    assert runner.invoke(app, ["sample", str(run), "--n", "8", "--class", "2", *trust]).exit_code == 0
    resumed = runner.invoke(app, ["resume", str(run), "trainer.max_steps=80", *trust])
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][-1] == 80
    evaluated = runner.invoke(app, ["eval", str(run), "--n", "200", *trust])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    # Class metrics come from the dataset's declared labels, with classifiers trained on it.
    assert metrics["classes_covered"] == 4 and metrics["class_kl"] < 0.05
    assert min(v for k, v in metrics.items() if k.startswith("class_confidence")) > 0.9
