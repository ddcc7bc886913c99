"""Checkpoint directories are complete or ignored; retention keeps the k newest complete ones."""

from __future__ import annotations

import logging

import pytest
import torch

from genlab.errors import GenlabError
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
        latest = find_checkpoint(root, "latest")
    assert latest.name == "step_000001"
    assert "step_000002" in caplog.text
    net = torch.nn.Linear(2, 2)
    load_networks(latest, {"net": net})
    assert torch.all(net.weight == 1.0)


def test_find_checkpoint_by_step(tmp_path):
    for step in (5, 10):
        _save(tmp_path / "checkpoints", step, keep=None)
    assert find_checkpoint(tmp_path / "checkpoints", "step_5").name == "step_000005"
    assert find_checkpoint(tmp_path / "checkpoints", "step_7") is None
    with pytest.raises(ValueError):
        find_checkpoint(tmp_path / "checkpoints", "newest")


def _adapted(seed=0, frozen=True):
    """A frozen 'base' layer (rebuilt from `seed`) under a small trainable 'adapter', plus a buffer."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2), torch.nn.BatchNorm1d(2))
    net[0].requires_grad_(not frozen)
    return net


def test_partly_frozen_network_is_saved_as_its_trainable_part(tmp_path):
    net = _adapted()
    with torch.no_grad():
        net[1].weight.add_(1.0)  # "training"
    net.train()(torch.randn(4, 64))  # moves the BatchNorm's running stats (buffers)
    path = save_checkpoint(tmp_path, 1, {"net": net}, {}, {"step": 1}, keep=None)
    from safetensors.torch import load_file

    saved = load_file(path / "net.safetensors")
    assert "0.weight" not in saved and {"1.weight", "1.bias", "2.running_mean"} <= saved.keys()
    assert (path / "net.safetensors").stat().st_size < 0.2 * 64 * 64 * 4
    rebuilt = _adapted()  # the family's constructor: same frozen base, fresh adapter
    load_networks(path, {"net": rebuilt})
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), rebuilt.state_dict().values()))
    # A fully trainable network is still saved whole.
    whole = save_checkpoint(tmp_path, 2, {"net": _adapted(frozen=False)}, {}, {"step": 2}, keep=None)
    assert "0.weight" in load_file(whole / "net.safetensors")


def test_trainable_only_checkpoint_refuses_what_does_not_fit(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"net": _adapted()}, {}, {"step": 1}, keep=None)
    more = _adapted()
    more[0].requires_grad_(True)  # now expects the base's weights too
    with pytest.raises(GenlabError, match=r"2 trainable weight\(s\) missing \(e.g. 0.bias, 0.weight\)"):
        load_networks(path, {"net": more})
    wider = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3), torch.nn.BatchNorm1d(3))
    wider[0].requires_grad_(False)
    with pytest.raises(GenlabError, match="another shape"):
        load_networks(path, {"net": wider})
    with pytest.raises(GenlabError, match="model.base"):  # the frozen base is not the one trained on
        load_networks(path, {"net": _adapted(seed=1)})


FILES = {"net.safetensors", "training_state.pt", "state.json", "COMPLETE"}


def _kill_at(monkeypatch, n: int) -> list[str]:
    """Make the n-th file operation of a save (each write, fsync and rename) die before it happens."""
    import pathlib

    from genlab.train import checkpoint as ckpt

    seen = []

    def killer(name, real):
        def call(*args, **kwargs):
            seen.append(name)
            if len(seen) == n:
                raise KeyboardInterrupt(f"killed at {name}")
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(ckpt, "save_file", killer("save_file", ckpt.save_file))
    monkeypatch.setattr(ckpt.torch, "save", killer("torch.save", ckpt.torch.save))
    monkeypatch.setattr(pathlib.Path, "write_text", killer("write_text", pathlib.Path.write_text))
    monkeypatch.setattr(ckpt, "_fsync", killer("fsync", ckpt._fsync))
    monkeypatch.setattr(ckpt.os, "replace", killer("replace", ckpt.os.replace))
    return seen


def test_a_kill_at_any_file_operation_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    """Die before each write, fsync and rename of a save in turn: on disk there is the old set of
    checkpoints or the old and the new, and every directory that looks complete has every file."""
    with monkeypatch.context() as m:
        operations = _kill_at(m, 0)
        _save(tmp_path / "count", 1, keep=None)
    assert len(operations) >= 8  # 3 files written, 4 + 1 fsyncs, a rename, and COMPLETE
    for n in range(1, len(operations) + 1):
        root = tmp_path / f"kill{n}" / "checkpoints"
        _save(root, 1, keep=1)
        with monkeypatch.context() as m:
            _kill_at(m, n)
            with pytest.raises(KeyboardInterrupt):
                _save(root, 2, keep=1)
        complete = complete_checkpoints(root)
        assert [c.name for c in complete] in (["step_000001"], ["step_000001", "step_000002"]), (n, operations[n - 1])
        for c in complete:
            assert FILES <= {p.name for p in c.iterdir()}, (n, operations[n - 1], c)
            net = torch.nn.Linear(2, 2)
            load_networks(c, {"net": net})
            assert torch.all(net.weight == float(c.name[-1]))
