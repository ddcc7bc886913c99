"""trainer.effective_batch_size: the largest micro-batch that fits, grad_accum for the rest."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import toy_family
from conftest import compose, toy_config
from genlab.config import check_values
from genlab.errors import ConfigError, GenlabError
from genlab.run_dir import RunDir
from genlab.train.checkpoint import load_state
from genlab.train.job import run_training
from genlab.train.micro_batch import candidates


@pytest.fixture
def memory_limit(monkeypatch):
    """The Toy family runs 'out of CUDA memory' on micro-batches above `limit[0]`; `tried` records sizes."""
    limit, tried = [16], []
    real_loss = toy_family.Toy.loss

    def loss(self, phase, batch, step, rng):
        tried.append(len(batch["image"]))
        if len(batch["image"]) > limit[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by the test)")
        return real_loss(self, phase, batch, step, rng)

    monkeypatch.setattr(toy_family.Toy, "loss", loss)
    return limit, tried


def _state(run_dir):
    return load_state(RunDir(run_dir).checkpoint("latest"))


def _weights(run_dir):
    return load_file(RunDir(run_dir).checkpoint("latest") / "net.safetensors")


def test_probe_picks_the_largest_micro_batch_that_fits_and_leaves_no_trace(tmp_path, memory_limit):
    """48 = 16 x 3 when 48 and 24 run out of memory; the run equals one given batch_size=16 grad_accum=3."""
    _, tried = memory_limit
    auto = tmp_path / "auto"
    cfg = toy_config("trainer.effective_batch_size=48", "trainer.max_steps=3", noise=True)
    (auto / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, auto / ".hydra" / "config.yaml")
    run_training(cfg, auto)
    assert tried[:3] == [48, 24, 16]  # largest first, down the divisors of 48
    assert (_state(auto)["batch_size"], _state(auto)["grad_accum"]) == (16, 3)
    saved = OmegaConf.load(auto / ".hydra" / "config.yaml").trainer  # what resume and sample read
    assert (saved.batch_size, saved.grad_accum) == (16, 3)

    explicit = tmp_path / "explicit"
    run_training(toy_config("trainer.batch_size=16", "trainer.grad_accum=3", "trainer.max_steps=3", noise=True), explicit)
    a, b = _weights(auto), _weights(explicit)
    assert all(torch.equal(a[k], b[k]) for k in a), "probing changed the run (weights or RNG)"


def test_resume_keeps_the_checkpoints_micro_batch_without_probing(tmp_path, memory_limit):
    limit, tried = memory_limit
    run = tmp_path / "run"
    run_training(toy_config("trainer.effective_batch_size=48", "trainer.max_steps=2", noise=True), run)
    limit[0], tried[:] = 24, []  # more memory now: a new probe would pick 24
    run_training(toy_config("trainer.effective_batch_size=48", "trainer.max_steps=4", noise=True), run, resume=True)
    assert 48 not in tried and (_state(run)["batch_size"], _state(run)["grad_accum"]) == (16, 3)

    straight = tmp_path / "straight"
    run_training(toy_config("trainer.batch_size=16", "trainer.grad_accum=3", "trainer.max_steps=4", noise=True), straight)
    a, b = _weights(run), _weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nothing_fits_says_so(tmp_path, memory_limit):
    limit, _ = memory_limit
    limit[0] = 0
    with pytest.raises(GenlabError, match="even a micro-batch of 1 runs out of memory"):
        run_training(toy_config("trainer.effective_batch_size=4", "trainer.max_steps=1"), tmp_path)


def test_candidates_are_divisors_largest_first_within_the_caps():
    assert candidates(48, 1, None, 1000) == [48, 24, 16, 12, 8, 6, 4, 3, 2, 1]
    assert candidates(48, 2, None, 1000)[0] == 24  # per process
    assert candidates(32, 1, 10, 1000) == [8, 4, 2, 1]  # trainer.max_micro_batch
    assert candidates(48, 1, None, 20)[0] == 16  # a micro-batch never exceeds the dataset


def test_effective_batch_not_divisible_by_processes_is_a_config_error():
    with pytest.raises(ConfigError, match=r"effective_batch_size=10 does not split over 4 processes.*multiple of 4"):
        candidates(10, 4, None, 1000)


@pytest.mark.parametrize("override", ["trainer.effective_batch_size=0", "trainer.max_micro_batch=-2",
                                      "trainer.effective_batch_size=1.5"])
def test_bad_values_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        check_values(compose(override))
