"""Checkpoint directories are complete or ignored; retention keeps the k newest complete ones."""

from __future__ import annotations

import logging

import pytest
import torch

from genlab.train.checkpoint import complete_checkpoints, find_checkpoint, load_networks, save_checkpoint


def _save(root, step, keep):
    net = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(net.weight, float(step))
    return save_checkpoint(root, step, {"net": net}, {"training_state.pt": {"step": step}}, {"step": step}, keep)


@pytest.mark.parametrize("keep", [1, 3])
def test_retention_keeps_the_k_newest(tmp_path, keep):
    for step in range(1, 12):  # 11 saves
        _save(tmp_path / "checkpoints", step, keep)
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == [
        f"step_{s:06d}" for s in range(12 - keep, 12)]


def test_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    _save(root, 1, keep=None)
    broken = _save(root, 2, keep=None)
    (broken / "COMPLETE").unlink()  # as if killed between writing files and the marker
    (root / ".step_000003.tmp").mkdir()  # a save killed half-way
    with caplog.at_level(logging.WARNING):
        latest = find_checkpoint(tmp_path, "latest")
    assert latest.name == "step_000001"
    assert "step_000002" in caplog.text
    net = torch.nn.Linear(2, 2)
    load_networks(latest, {"net": net})
    assert torch.all(net.weight == 1.0)


def test_find_checkpoint_by_step(tmp_path):
    for step in (5, 10):
        _save(tmp_path / "checkpoints", step, keep=None)
    assert find_checkpoint(tmp_path, "step_5").name == "step_000005"
    assert find_checkpoint(tmp_path, "step_7") is None
    with pytest.raises(ValueError):
        find_checkpoint(tmp_path, "newest")
