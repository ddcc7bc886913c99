"""The optimizer configs: Adam(W) default to foreach updates (bitwise the per-tensor loop's result),
`fused=true` is one override; 8-bit AdamW (bitsandbytes, CUDA only) composes, builds, or says what is missing."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import types

import pytest
import torch
from hydra.utils import instantiate

from conftest import assert_same_up_to_rounding, compose, toy_config
from genlab.errors import GenlabError
from genlab.train.job import run_training
from genlab.train.optimizers import from_config

HAVE_8BIT = importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAVE_8BIT, reason="bitsandbytes and a CUDA GPU are here: nothing is missing")
def test_adamw8bit_says_what_is_missing_and_what_to_do(tmp_path):
    cfg = compose("optimizer=adamw8bit", "trainer.lr=3e-4")
    assert cfg.optimizer._target_ == "genlab.train.optimizers.adamw8bit"
    with pytest.raises(GenlabError, match=r"optimizer=adamw8bit: .*(pip install bitsandbytes|CUDA).*use optimizer=adamw"):
        instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    # Through the loop: the run stops with that message and says so in status.json.
    with pytest.raises(GenlabError, match="optimizer=adamw8bit"):
        run_training(toy_config("optimizer=adamw8bit"), tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "use optimizer=adamw" in status["error"]


def test_adamw8bit_hands_its_config_to_bitsandbytes(monkeypatch):
    """With bitsandbytes and a GPU (stand-ins here): the config's values reach AdamW8bit's real signature."""
    built = {}

    class AdamW8bit(torch.optim.AdamW):  # bitsandbytes 0.50's signature
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                     optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):
            built.update(betas=betas, min_8bit_size=min_8bit_size, is_paged=is_paged)
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    fake = types.ModuleType("bitsandbytes")
    fake.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = compose("optimizer=adamw8bit", "trainer.lr=3e-4", "optimizer.min_8bit_size=16")
    optimizer = instantiate(cfg.optimizer)([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": cfg.trainer.lr}])
    assert isinstance(optimizer, AdamW8bit) and optimizer.param_groups[0]["lr"] == 3e-4
    assert built == {"betas": (0.9, 0.999), "min_8bit_size": 16, "is_paged": False}


def _train_three_steps(make) -> torch.Tensor:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    optimizer = make([{"params": net.parameters(), "lr": 1e-2}])
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(5, 8)).pow(2).mean().backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_configs_use_foreach_updates_with_the_per_tensor_loops_result(name):
    """foreach is genlab's default (torch's own default on a CPU is the slower per-tensor loop)."""
    cfg = compose(f"optimizer={name}", "optimizer.weight_decay=0.01")
    make = from_config(cfg.optimizer)
    assert make([torch.nn.Parameter(torch.zeros(2))]).defaults["foreach"] is True
    per_tensor = from_config(compose(f"optimizer={name}", "optimizer.weight_decay=0.01", "optimizer.foreach=false").optimizer)
    # Two implementations (torch's _multi_tensor_adam and _single_tensor_adam) with their own op
    # sequences: the same update up to float rounding. Weights are of order 0.3 and move by about 3e-2
    # in three steps; 1e-6 is 20 float32 epsilons of that and 1000x below one step's update.
    assert_same_up_to_rounding(_train_three_steps(make), _train_three_steps(per_tensor), atol=1e-6)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_is_one_override_and_replaces_foreach(name):
    """torch refuses fused and foreach together; `optimizer.fused=true` alone must build and train."""
    make = from_config(compose(f"optimizer={name}", "optimizer.fused=true").optimizer)
    optimizer = make([torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]
    assert torch.isfinite(_train_three_steps(make)).all()


def test_the_loop_builds_its_optimizer_through_from_config(tmp_path):
    """`genlab train optimizer.fused=true` trains: the loop takes the same path as the test above."""
    run_training(toy_config("optimizer.fused=true", "trainer.max_steps=2"), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"
