"""scripts/gpu_check.py, the one command a GPU session runs: its parts and its JSON, at toy sizes on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_junit_outcomes_are_read_by_name(tmp_path):
    (tmp_path / "r.xml").write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
        '<testcase name="c"><skipped message="needs a CUDA GPU"/></testcase><testcase name="d"><error/></testcase>'
        '</testsuite></testsuites>')
    assert gpu_check.test_outcomes(tmp_path / "r.xml") == {
        "a": "passed", "b": "failed", "c": "skipped (needs a CUDA GPU)", "d": "failed"}


@pytest.mark.slow  # three subprocesses at toy sizes: ~2 min on 2 cores
def test_smoke_run_writes_every_part(tmp_path):
    out = gpu_check.main(["--smoke", "--out", str(tmp_path / "check.json")])
    report = json.loads(out.read_text())
    assert set(report["parts"]) == {"gpu_tests", "mfu", "controlnet"}
    assert all(part["exit_code"] == 0 for part in report["parts"].values()), report
    assert report["parts"]["gpu_tests"]["results"] and all(
        v.startswith("skipped") for v in report["parts"]["gpu_tests"]["results"].values())  # no CUDA here
    assert "mfu" in report["parts"]["mfu"]["results"]
