"""Every bad input gets one sentence and the right exit code, and no run is changed or lost.

Exit codes: 0 success, 2 a bad request (config, option), 1 an expected failure (a damaged
run, a missing file). Commands run in-process through Typer's CliRunner (no 7 s import
per call); `genlab train` of a bad config goes through the real CLI where Hydra is involved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_DDPM, assert_same_png_pixels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from genlab.cli import app
from genlab.run_dir import RunDir

STEP_4 = Path("checkpoints") / "step_000004"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, str]:
    """What a run holds that no command but train/resume may change: all but samples made by
    `genlab sample`, eval/ (written by `genlab eval`) and the lock file."""
    def kept(p: Path) -> bool:
        rel = p.relative_to(root)
        return p.is_file() and rel.parts[0] != "eval" and not rel.name.startswith("sample_") and p.name != ".lock"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if kept(p)}


def assert_clean(result, codes=(1, 2), *expected: str) -> None:
    """The exit code, no traceback, and the expected words in the one-sentence message."""
    assert result.exit_code in codes, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for text in expected:
        assert text in result.output, result.output


@pytest.fixture
def run(tiny_ddpm_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_ddpm_run, copy)
    return copy


# ---- sample / eval options --------------------------------------------------------------
@pytest.mark.parametrize("args, code, words", [
    (["--n", "0"], 2, ["--n"]), (["--n", "-1"], 2, ["--n"]), (["--steps", "0"], 2, ["--steps"]),
    (["--steps", "-1"], 2, ["--steps"]), (["--steps", "5000"], 1, ["--steps 5000", "1 to 1000"]),
    (["--n", "2000"], 2, ["--separate"]), (["--sampler", "euler"], 1, ["euler"]),
    (["--checkpoint", "step_3"], 1, ["no complete checkpoint 'step_3'"]), (["--checkpoint", "newest"], 2, ["step_N"]),
    (["--class", "3"], 1, ["conditional"]), (["--sketch", "missing.png"], 1, ["missing.png"]),
])
def test_sample_refuses_bad_options_in_one_sentence(run, tmp_path, args, code, words):
    before = snapshot(run)
    result = invoke("sample", run, "--out", tmp_path / "grid.png", *args)
    assert_clean(result, (code,), *words)
    assert snapshot(run) == before


def test_a_corrupt_sketch_image_is_one_sentence(run, tmp_path):
    bad = tmp_path / "sketch.png"
    bad.write_bytes(b"not a png")
    assert_clean(invoke("sample", run, "--sketch", bad), (1,), "cannot be read as an image")


def test_many_samples_come_in_chunks_with_separate_files(run, tmp_path):
    result = invoke("sample", run, "--n", "300", "--separate", "--steps", "2", "--out", tmp_path / "g.png")
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("g_*.png"))) == 300
    # chunks are seeded seed + start: the first images of --n 300 are those of --n 2
    small = invoke("sample", run, "--n", "2", "--separate", "--steps", "2", "--out", tmp_path / "s.png")
    assert small.exit_code == 0
    # A batch of 2 and a chunk of 256 run the networks on other batch sizes (other kernels): same image up to rounding.
    assert_same_png_pixels(tmp_path / "s_000.png", tmp_path / "g_000.png")


def test_eval_n_zero_and_paths_with_spaces(run, tmp_path):
    assert_clean(invoke("eval", run, "--n", "0"), (2,), "--n")
    spaced = tmp_path / "my run"
    shutil.copytree(run, spaced)
    # an unquoted path reaches genlab as two words: say how to quote it
    for command in ("sample", "eval", "resume"):
        assert_clean(invoke(command, tmp_path / "my", "run"), (2,), f"quote it: '{tmp_path / 'my'} run'")


# ---- damaged runs -------------------------------------------------------------------------
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run, tmp_path, caplog):
    (run / STEP_4 / "unet.safetensors").write_bytes(b"\0" * 100)
    result = invoke("sample", run, "--n", "2", "--steps", "2", "--out", tmp_path / "g.png")
    assert result.exit_code == 0, result.output
    assert "skipping damaged checkpoint" in caplog.text and "step_000004" in caplog.text
    # a truncated state.json: resume continues from step 2 and ends at the new max_steps
    shutil.rmtree(run / STEP_4)
    shutil.copytree(run / "checkpoints" / "step_000002", run / STEP_4)
    (run / STEP_4 / "state.json").write_text('{"step": 4, "data_po')
    result = invoke("resume", run, "trainer.max_steps=5")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in RunDir(run).read_metrics()] == [1, 2, 3, 4, 5]


def test_no_readable_checkpoint_is_one_sentence(run):
    for step in ("step_000002", "step_000004"):
        (run / "checkpoints" / step / "unet.safetensors").write_bytes(b"")
    assert_clean(invoke("sample", run, "--n", "1"), (1,), "no checkpoint of", "can be read")


def test_an_unreadable_config_is_one_sentence(run):
    (run / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    for args in (["sample", run], ["eval", run], ["resume", run, "trainer.max_steps=6"]):
        assert_clean(invoke(*args), (1,), "config.yaml cannot be read")
    (run / ".hydra" / "config.yaml").write_text("- just\n- a list\n")
    assert_clean(invoke("sample", run), (1,), "not a genlab run config")


def test_runs_table_survives_torn_metrics_and_unreadable_runs(run, tmp_path):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a kill in mid-write
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / ".hydra" / "config.yaml").write_text(":\n  - [")
    result = invoke("runs", tmp_path)
    assert result.exit_code == 0, result.output
    assert "4/4" in result.output and "unreadable" in result.output and "finished" in result.output
    # resume drops the torn line atomically and carries on
    assert invoke("resume", run, "trainer.max_steps=5").exit_code == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]


def test_resume_of_a_finished_run_says_what_would_continue_it(run):
    before = snapshot(run)
    assert_clean(invoke("resume", run), (2,), "finished at step 4", "trainer.max_steps=N")
    assert_clean(invoke("resume", run, "trainer.max_steps=3"), (2,), "finished at step 4")
    assert snapshot(run) == before


def test_a_failed_resume_leaves_a_finished_run_finished(run):
    result = invoke("resume", run, "trainer.max_steps=6", "trainer.batch_size=5000")
    assert_clean(result, (1, 2), "trainer.batch_size=5000")
    assert RunDir(run).read_status()["status"] == "finished"


@pytest.mark.parametrize("override, words", [
    ("trainer.grad_clip=-1", "trainer.grad_clip"), ("data.image_size=0", "data.image_size"),
    ("trainer.lr=-0.1", "trainer.lr"), ("trainer.ema=2", "trainer.ema"), ("model=ddpn", "did you mean 'ddpm'"),
])
def test_bad_training_values_exit_2_before_anything_is_created(tmp_path, monkeypatch, override, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GENLAB_RUNS", str(tmp_path / "runs"))
    assert_clean(invoke("train", *TINY_DDPM, override), (2,), words)
    assert list(tmp_path.iterdir()) == []


# ---- property-based: any value of any option ------------------------------------------------
VALUES = st.one_of(st.integers(-3, 3), st.sampled_from([0, 1, 2, 64, 10**9, -(10**9)]),
                   st.floats(allow_nan=True, allow_infinity=True, width=32), st.booleans(), st.none(),
                   st.sampled_from(["", "x", "null", "[1,2]", "{a: 1}", "1e-3", "ddim", "'quoted'"]))
TRAIN_KEYS = ["trainer.max_steps", "trainer.batch_size", "trainer.grad_accum", "trainer.lr", "trainer.grad_clip",
              "trainer.mixed_precision", "trainer.ema", "trainer.log_every", "trainer.sample_every",
              "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.effective_batch_size",
              "trainer.on_nonfinite", "trainer.seed", "data.image_size", "data.channels", "data.num_workers",
              "data.val_fraction", "model.objective", "model.schedule", "model.sampler",
              "model.sample_steps", "model.weighting", "model.snr_gamma", "model.backbone", "model.guidance", "model.conditional",
              "model.num_train_timesteps", "model.unet.layers_per_block", "eval.n_samples"]


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _check_training_value(key, value):
    """Through `genlab train --cfg job` (validation, no training): exit 0 or 2, never a traceback."""
    result = invoke("train", "--cfg", "job", *TINY_DDPM, f"{key}={_yaml(value)}")
    assert_clean(result, (0, 2))


FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)  # ~0.5 s a case


@settings(max_examples=10, **FUZZ)  # the slow suite tries 300
@given(key=st.sampled_from(TRAIN_KEYS), value=VALUES)
def test_any_training_value_is_accepted_or_refused_in_one_sentence(key, value):
    _check_training_value(key, value)


@pytest.mark.slow
@settings(max_examples=300, **FUZZ)
@given(key=st.sampled_from(TRAIN_KEYS), value=VALUES)
def test_many_training_values_are_accepted_or_refused_in_one_sentence(key, value):
    _check_training_value(key, value)


SAMPLE_OPTIONS = st.fixed_dictionaries({}, optional={
    "--n": st.sampled_from([-1, 0, 1, 3, 2000]), "--steps": st.sampled_from([-1, 0, 1, 2, 1001, 10**6]),
    "--sampler": st.sampled_from(["ddpm", "ddim", "dpm", "unipc", "euler", ""]),
    "--guidance": st.floats(allow_nan=True, allow_infinity=True, width=16), "--class": st.integers(-2, 12),
    "--seed": st.integers(-5, 2**40), "--checkpoint": st.sampled_from(["latest", "best", "step_2", "step_3", "x"]),
    "--temperature": st.floats(-1, 2), "--truncation": st.floats(-1, 2), "--control-scale": st.floats(-1, 2),
    "--control-mode": st.sampled_from(["sketch", "3", "x"]),
    "--prompt": st.text(max_size=5), "--interpolate": st.just(None), "--reconstruct": st.just(None),
    "--no-ema": st.just(None), "--separate": st.just(None), "--lora": st.just("missing_lora"),
})


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory, tiny_ddpm_run):
    copy = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(tiny_ddpm_run, copy)
    return copy


@settings(max_examples=40, **FUZZ)  # ~0.1 s a case (most options are refused before a model is built); slow: 400
@given(options=SAMPLE_OPTIONS)
def test_any_sample_options_give_images_or_one_sentence(fuzz_run, tmp_path_factory, options):
    _check_sample_options(fuzz_run, tmp_path_factory, options)


@pytest.mark.slow
@settings(max_examples=400, **FUZZ)
@given(options=SAMPLE_OPTIONS)
def test_many_sample_options_give_images_or_one_sentence(fuzz_run, tmp_path_factory, options):
    _check_sample_options(fuzz_run, tmp_path_factory, options)


def _check_sample_options(fuzz_run, tmp_path_factory, options):
    out = tmp_path_factory.mktemp("out") / "g.png"
    before = snapshot(fuzz_run)
    args = [a for k, v in options.items() for a in ([k] if v is None else [k, str(v)])]
    result = invoke("sample", fuzz_run, "--out", out, *args)
    assert_clean(result, (0, 1, 2))
    assert snapshot(fuzz_run) == before


@settings(max_examples=8, **FUZZ)
@given(n=st.sampled_from([-1, 0, 2]), checkpoint=st.sampled_from(["latest", "best", "step_2", "nope"]),
       ema=st.booleans())
def test_any_eval_options_give_metrics_or_one_sentence(fuzz_run, n, checkpoint, ema):
    before = snapshot(fuzz_run)
    result = invoke("eval", fuzz_run, "--n", n, "--checkpoint", checkpoint, "--ema" if ema else "--no-ema")
    assert_clean(result, (0, 1, 2))
    assert snapshot(fuzz_run) == before
