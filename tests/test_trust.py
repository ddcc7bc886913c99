"""Loading a run never runs code from it: crafted checkpoints and configs are refused in one sentence."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from genlab.cli import app
from genlab.run_dir import RunDir, UntrustedConfig, check_targets


class Payload:
    """Unpickling this runs code: it writes a marker file (what an attacker's pickle would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def run(tiny_ddpm_run, tmp_path):
    """A copy of the shared tiny DDPM run that a test may tamper with."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_ddpm_run, copy)
    return copy


def assert_one_sentence(result, *expected: str):
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for text in expected:
        assert text in result.output, result.output


@pytest.mark.parametrize("filename, command", [("ema.pt", "sample"), ("ema.pt", "eval"),
                                               ("training_state.pt", "resume")])
def test_a_pickle_in_a_checkpoint_never_runs(run, tmp_path, filename, command):
    marker = tmp_path / "marker"
    latest = run / "checkpoints" / "step_000004"
    torch.save({"shadow_params": [Payload(marker)]}, latest / filename)
    args = {"sample": ["sample", str(run), "--n", "2", "--out", str(tmp_path / "x.png")],
            "eval": ["eval", str(run), "--n", "2"],
            "resume": ["resume", str(run), "trainer.max_steps=6"]}[command]
    result = invoke(*args)
    assert not marker.exists(), "the pickle ran"
    assert_one_sentence(result, filename, "never writes")
    # --trust-run allows numpy arrays for old runs, never arbitrary objects
    result = invoke(*args, "--trust-run")
    assert not marker.exists(), "the pickle ran under --trust-run"
    assert_one_sentence(result, filename)


def test_a_config_target_outside_the_allowlist_never_runs(run, tmp_path):
    """torch.load(weights_only=False) is a callable that Hydra happily instantiates: it runs a pickle."""
    marker = tmp_path / "marker"
    torch.save(Payload(marker), tmp_path / "payload.pt")
    config = run / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["model"] = {"_target_": "torch.load", "f": str(tmp_path / "payload.pt"), "weights_only": False}
    config.write_text(yaml.safe_dump(cfg))
    before = config.read_bytes()
    for args in (["sample", str(run), "--n", "1", "--out", str(tmp_path / "x.png")], ["eval", str(run), "--n", "1"],
                 ["resume", str(run), "trainer.max_steps=6"]):
        result = invoke(*args)
        assert not marker.exists(), f"{args[0]} ran the payload"
        assert_one_sentence(result, "model._target_='torch.load'", "--allow-target torch")
    assert config.read_bytes() == before


def test_allow_target_trusts_a_prefix_on_purpose():
    cfg = {"model": {"_target_": "mylab.families.Mine"}, "optimizer": {"_target_": "torch.optim.AdamW"}}
    with pytest.raises(UntrustedConfig, match="model._target_='mylab.families.Mine'"):
        check_targets(cfg, "config.yaml")
    check_targets(cfg, "config.yaml", allow=("mylab",))
    # a prefix is a whole package name: "mylab" does not trust "mylabevil"
    with pytest.raises(UntrustedConfig):
        check_targets({"x": {"_target_": "mylabevil.run"}}, "config.yaml", allow=("mylab",))
    # nested in lists too
    with pytest.raises(UntrustedConfig, match=r"callbacks\[1\]._target_"):
        check_targets({"callbacks": [{"_target_": "genlab.x"}, {"_target_": "os.system"}]}, "config.yaml")


def test_runs_before_0_2_need_trust_run(run, tmp_path):
    """Old training states pickled numpy's RNG state: refused with a sentence naming --trust-run, loaded with it."""
    latest = run / "checkpoints" / "step_000004"
    state = torch.load(latest / "training_state.pt", weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()  # what genlab < 0.2 saved: a tuple holding an ndarray
    torch.save(state, latest / "training_state.pt")
    result = invoke("resume", str(run), "trainer.max_steps=5")
    assert_one_sentence(result, "before 0.2", "--trust-run")
    assert RunDir(run).read_status()["status"] == "finished"  # a refused resume leaves the run as it was
    result = invoke("resume", str(run), "trainer.max_steps=5", "--trust-run")
    assert result.exit_code == 0, result.output
    assert [row["step"] for row in RunDir(run).read_metrics()] == [1, 2, 3, 4, 5]
