"""trainer.eval_every: metrics during training, checkpoints/best, early stopping, `genlab eval`."""

from __future__ import annotations

import json

from conftest import TINY_DDPM, cli, toy_config

from genlab.train.best import BestTracker
from genlab.train.job import run_training


def test_best_tracker_direction_and_patience():
    fid = BestTracker("fid_digits_cnn", patience=2)
    assert fid.update(1, {"fid_digits_cnn": 10.0}) and fid.update(2, {"fid_digits_cnn": 8.0})
    assert not fid.update(3, {"fid_digits_cnn": 9.0}) and not fid.should_stop
    assert not fid.update(4, {"fid_digits_cnn": 8.5}) and fid.should_stop and fid.best_step == 2
    recall = BestTracker("auto")
    recall.update(1, {"recall_x": 0.5, "fid_x": 3.0})
    assert recall.metric == "fid_x"  # auto prefers FID
    iou = BestTracker("disc_iou")
    iou.update(1, {"disc_iou": 0.5})
    assert iou.update(2, {"disc_iou": 0.7})  # higher is better


def test_early_stopping_stops_the_loop(tmp_path):
    # eval_samples never changes, so nothing after the first evaluation is better
    cfg = toy_config("trainer.max_steps=20", "trainer.eval_every=1", "trainer.eval_samples=16",
                     "trainer.best_metric=eval_samples", "trainer.early_stop_patience=2", "eval.n_reference=100")
    summary = run_training(cfg, tmp_path)
    assert summary["step"] == 3 and summary["best_eval_samples"] == 16
    best = json.loads((tmp_path / "checkpoints" / "best" / "state.json").read_text())
    assert best["step"] == 1 and (tmp_path / "checkpoints" / "best" / "COMPLETE").exists()


def test_eval_during_training_and_genlab_eval(tmp_path):
    run = tmp_path / "run"
    cli("train", *TINY_DDPM, "trainer.eval_every=2", "trainer.eval_samples=20", "eval.n_reference=200",
           f"hydra.run.dir={run}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fid_digits_cnn" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["classes_covered"] <= 10 and r["fid_digits_cnn"] > 0 for r in evals)
    assert (run / "checkpoints" / "best" / "COMPLETE").exists()
    assert "fid_digits_cnn=" in cli("runs", str(tmp_path)).stdout  # the best metric is in the table
    cli("sample", str(run), "--checkpoint", "best", "--n", "4", "--out", str(tmp_path / "best.png"))
    result = cli("eval", str(run), "--n", "20", "--checkpoint", "best")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["eval_samples"] == 20 and "fid_digits_cnn" in metrics and "precision_digits_cnn" in result.stdout
