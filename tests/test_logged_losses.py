"""A family's declared losses are what every reader shows, not the logged keys with "loss" in their names.

`MSEWithScale` declares one loss, `mse`, and also logs `loss_scale` (a mixed-precision loss scale: "loss"
in its name, not a loss). The training summary, the progress line, `genlab runs`, the model card and the
report must all pick `mse` alone; a name guess would pick `loss_scale`.
"""

from __future__ import annotations

import pytest
import torch

from conftest import toy_config
from genlab.families.logged import direction, losses, lower_is_better
from genlab.run_dir import RunDir
from toy_family import Toy


class MSEWithScale(Toy):
    """The Toy, its loss logged as `mse`, beside a constant that is not a loss (higher is better here)."""

    name = "mse_scale"
    losses = ("mse",)
    metrics = {"loss_scale": "higher"}

    def loss(self, phase, batch, step, rng):
        loss, _ = super().loss(phase, batch, step, rng)
        return loss, {"mse": loss.detach(), "loss_scale": torch.tensor(1024.0)}


def test_declared_losses_win_and_the_fallback_is_for_families_that_declare_none():
    assert losses(("mse",), ["mse", "loss_scale"]) == ("mse",)
    assert losses((), ["step", "g_loss", "d_loss", "lr_g"]) == ("g_loss", "d_loss")  # declares none: the fallback
    assert losses(None, ["loss", "loss"]) == ("loss",)
    assert not lower_is_better("loss_scale", {}, ("mse",))  # not declared a loss: not "lower" by its name
    assert lower_is_better("my_loss", {}, ())  # a family that declares nothing: the one fallback
    assert lower_is_better("mse", {}, ("mse",)) and lower_is_better("best_mse", {}, ("mse",))
    assert direction("ms_ratio", {"ms_ratio": "lower"}) == "lower"
    assert direction("fid_digits_cnn@trunc0.5") == "lower" and direction("recall_digits_mlp") == "higher"


@pytest.fixture(scope="module")
def declared_run(tmp_path_factory, one_thread):
    from genlab.train.job import run_job

    run = tmp_path_factory.mktemp("logged") / "run"
    cfg = toy_config("trainer.max_steps=3", "trainer.checkpoint_every=3")
    cfg.model._target_ = "test_logged_losses.MSEWithScale"
    RunDir(run).write_config(cfg)  # as Hydra does for `genlab train`: the card and `genlab runs` read it
    summary = run_job(cfg, run)
    return cfg, summary, RunDir(run)


def test_the_summary_and_progress_line_show_the_declared_loss(declared_run, capsys):
    from genlab.train.job import summary_losses
    from genlab.train.tracking import progress_info

    cfg, summary, _ = declared_run
    assert summary["loss_scale"] == 1024.0 and "mse" in summary
    assert list(summary_losses(cfg, summary)) == ["mse"]
    assert progress_info({"mse": 0.5, "loss_scale": 1024.0, "images_per_s": 10.0}, ("mse",)) == "mse=0.5  img/s=10"


def test_runs_card_and_report_pick_the_declared_loss(declared_run):
    from genlab.report.collect import load_run, objective_of
    from genlab.report.figures import panels_of
    from genlab.runs import run_info

    _, _, run = declared_run
    info = run_info(run)
    assert info["loss_keys"] == ("mse",) and list(info["losses"]) == ["mse"]
    card = (run.export / "README.md").read_text()
    assert "- last logged: mse=" in card and "loss_scale=" not in card
    data = load_run(run, run.path.parent)
    assert dict(panels_of(list(data.series), data.info["loss_keys"]))["losses"] == ["mse"]
    assert objective_of([data]) == "mse"


class Improving(Toy):
    """Logs a declared loss that falls every step (1/step) beside a rising `loss_scale` that is not a loss."""

    losses = ("mse",)
    metrics = {"loss_scale": "higher"}

    def loss(self, phase, batch, step, rng):
        loss, _ = super().loss(phase, batch, step, rng)
        return loss, {"mse": torch.tensor(1.0 / (step + 1)), "loss_scale": torch.tensor(1024.0 * (step + 1))}


def test_the_plateau_schedule_watches_the_declared_loss(tmp_path, one_thread):
    """ReduceLROnPlateau (patience 0) on `mse`, which improves every step: the LR never drops. Watching every
    key with "loss" in its name would watch the rising `loss_scale` and halve it at each log step."""
    from genlab.train.job import run_training

    cfg = toy_config("lr_schedule=plateau", "lr_schedule.patience=0", "lr_schedule.factor=0.5", "trainer.lr=0.01",
                     "trainer.max_steps=4", "trainer.log_every=1", "trainer.checkpoint_every=4")
    cfg.model._target_ = "test_logged_losses.Improving"
    run_training(cfg, tmp_path / "run")
    lrs = [row["lr_net"] for row in RunDir(tmp_path / "run").read_metrics()]
    assert len(lrs) == 4 and lrs == pytest.approx([0.01] * 4)
