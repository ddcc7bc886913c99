"""scripts/quality.py end to end on tiny models (--smoke): the JSON a quality report is built from."""

from __future__ import annotations

import json
import math
import operator
import subprocess
import sys
from pathlib import Path

import pytest

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a real subprocess run of ~10-25 s; `make test-slow` (CI) runs it
def test_quality_script_smoke_writes_report_grids_and_plot(tmp_path):
    out = tmp_path / "bench"
    # A budget far below one step: the probe must cap max_steps (3 planned under --smoke) to 1.
    cmd = [sys.executable, "-m", "scripts.quality", "--smoke", "--recipes", "ddpm_digits,no_such_recipe",
           "--out-dir", str(out), "--runs-dir", str(tmp_path / "runs"), "--budget-minutes", "1e-6"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())

    assert report["machine"] and report["versions"]["torch"] and "--smoke" in report["command"]
    skipped = report["recipes"]["no_such_recipe"]
    assert skipped["status"] == "skipped" and "no_such_recipe.yaml does not exist" in skipped["reason"]

    ddpm = report["recipes"]["ddpm_digits"]
    assert ddpm["status"] == "done" and ddpm["extractor"] == "digits_cnn"
    assert (ddpm["planned_max_steps"], ddpm["max_steps"], ddpm["steps"]) == (3, 1, 1)
    assert ddpm["probe_steps_per_s"] > 0 and ddpm["train_seconds"] > 0
    metrics = ddpm["metrics"]
    assert metrics["eval_samples"] == 20 and math.isfinite(metrics["fid_digits_cnn"])
    assert 0 <= metrics["classes_covered"] <= 10 and metrics["class_kl"] >= 0
    # Real val digits are near-perfect by these metrics; a 1-step DDPM's noise is not.
    reference = ddpm["data_val_metrics"]
    assert reference["classes_covered"] == 10 and reference["class_confidence"] > 0.9
    assert metrics["fid_digits_cnn"] > 10 * reference["fid_digits_cnn"]

    # Each target's verdict is the comparison it states, on the reported value.
    assert [t["rule"] for t in ddpm["targets"]] == [  # every digits classifier must agree
        f"{rule}_{c}{bound}" for c in ("digits_cnn", "digits_mlp")
        for rule, bound in (("classes_covered", " >= 10"), ("class_kl", " <= 0.05"), ("class_confidence", " >= 0.9"))]
    for target in ddpm["targets"]:
        compare = operator.ge if " >= " in target["rule"] else operator.le
        assert target["value"] == metrics[target["rule"].split()[0]]
        assert target["met"] == compare(target["value"], target["bound"])
    assert ddpm["all_targets_met"] == all(t["met"] for t in ddpm["targets"]) == False  # noqa: E712

    assert [(r["sampler"], r["steps"]) for r in ddpm["samplers"]] == [("ddpm", 10), ("ddim", 5), ("dpm", 5)]
    assert all(r["seconds_per_image"] > 0 and math.isfinite(r["fid_digits_cnn"]) for r in ddpm["samplers"])
    assert Image.open(out / "ddpm_samplers.png").size == (1000, 400)
    # The run's final grid (sample_n=4: 2x2 images of 8 px, 1 px padding) copied beside the JSON.
    assert Image.open(out / "quality_ddpm_digits.png").size == (19, 19)
    run = Path(ddpm["run_dir"])
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert (run / ".hydra" / "config.yaml").exists()  # a run that `genlab sample / eval` accept
