"""Post-hoc EMA (genlab/posthoc_ema.py): the power-function profiles and their reconstruction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from genlab.posthoc_ema import (PowerEMA, gamma_of, profile_dot, reconstruct, reconstruction_weights,
                                      sigma_rel_of)


def test_gamma_and_sigma_rel_are_inverse():
    for sigma_rel in (0.01, 0.05, 0.10, 0.2, 0.28):
        assert sigma_rel_of(gamma_of(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.01)  # EDM2's two stored profiles
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01)
    with pytest.raises(ValueError, match="sigma_rel"):
        gamma_of(0.3)


def test_profile_dot_is_the_integral_of_the_two_profiles():
    def profile(t, gamma, tau):
        return np.where(tau <= t, (gamma + 1) * tau ** gamma / t ** (gamma + 1), 0.0)

    tau = np.linspace(0, 300, 600_001)
    for (ta, ga), (tb, gb) in [((100, 6.9), (300, 16.9)), ((300, 2.0), (200, 6.9)), ((250, 3.0), (250, 3.0))]:
        numeric = np.trapezoid(profile(ta, ga, tau) * profile(tb, gb, tau), tau)
        assert profile_dot(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-3)
        assert profile_dot(ta, ga, tb, gb) == profile_dot(tb, gb, ta, ga)


def test_power_ema_averages_with_the_power_profile():
    # Weights moving linearly, theta(t) = t: the profile's mean is (gamma + 1) / (gamma + 2) t.
    param = torch.zeros(1, dtype=torch.float64)
    ema = PowerEMA([param], sigma_rel=0.10)
    for step in range(1, 2001):
        param.fill_(step)
        ema.update([param], step)
    expected = (ema.gamma + 1) / (ema.gamma + 2) * 2000
    assert ema.average[0].item() == pytest.approx(expected, rel=2e-3)


def _train(steps: int, every: int, sigma_rels: tuple[float, ...], seed: int = 0):
    """A random walk of 3 weights with one PowerEMA per length; snapshots of the stored lengths every `every`."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.zeros(3)
    emas = {s: PowerEMA([param], s) for s in sigma_rels}
    snapshots = []
    for step in range(1, steps + 1):
        param += torch.randn(3, generator=gen) + 0.01 * step ** 0.5
        for ema in emas.values():
            ema.update([param], step)
        if step % every == 0:
            snapshots += [(step, ema.gamma, [a.clone() for a in ema.average]) for s, ema in emas.items()
                          if s in (0.05, 0.10)]
    return emas, snapshots


def test_a_stored_length_is_rebuilt_exactly():
    emas, snapshots = _train(400, 50, (0.05, 0.10))
    for sigma_rel, ema in emas.items():
        (rebuilt,) = reconstruct(snapshots, sigma_rel)
        assert torch.equal(rebuilt, ema.average[0])


def test_weights_for_a_stored_profile_pick_it_alone():
    stored = [(s, g) for s in (100, 200, 300, 400) for g in (gamma_of(0.05), gamma_of(0.10))]
    weights = reconstruction_weights(stored, 400, gamma_of(0.10))
    one_hot = np.zeros(len(stored))
    one_hot[stored.index((400, gamma_of(0.10)))] = 1.0
    np.testing.assert_allclose(weights, one_hot, atol=1e-6)


def test_another_length_is_rebuilt_close_to_the_ema_that_tracked_it():
    emas, snapshots = _train(2000, 100, (0.05, 0.10, 0.07, 0.15))
    for sigma_rel in (0.07, 0.15):
        (rebuilt,) = reconstruct(snapshots, sigma_rel)
        tracked = emas[sigma_rel].average[0]
        spread = (emas[0.05].average[0] - emas[0.10].average[0]).abs().max()
        # closer to the real EMA of that length than the two stored lengths are to each other
        assert (rebuilt - tracked).abs().max() < 0.005 * spread, (sigma_rel, rebuilt, tracked)


def test_an_earlier_step_uses_only_the_snapshots_up_to_it():
    emas, snapshots = _train(400, 50, (0.05, 0.10))
    late = [(s, g, [t + 1e6 for t in tensors]) if s > 200 else (s, g, tensors) for s, g, tensors in snapshots]
    assert torch.equal(reconstruct(late, 0.08, step=200)[0], reconstruct(snapshots, 0.08, step=200)[0])
    assert not math.isnan(reconstruct(snapshots, 0.08, step=200)[0].sum().item())


def test_state_dict_round_trips_and_refuses_another_shape():
    param = torch.randn(4)
    ema = PowerEMA([param, param * 2], 0.1)
    other = PowerEMA([torch.zeros(4), torch.zeros(4)], 0.1)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ema.average, other.average))
    with pytest.raises(ValueError, match="2 parameters"):
        other.load_state_dict({"0": torch.zeros(4)})


# ---- kept by training, read by `genlab sample` and `genlab eval` ------------------------------------
TINY = ["trainer=debug", "logger=none", "data.image_size=8", "trainer.sample_every=0", "trainer.keep_checkpoints=null",
        "model.unet.block_out_channels=[8,8]", "model.unet.down_block_types=[DownBlock2D,DownBlock2D]",
        "model.unet.up_block_types=[UpBlock2D,UpBlock2D]", "model.unet.norm_num_groups=4",
        "model.unet.attention_head_dim=8", "model.sample_steps=2",
        "trainer.posthoc_ema.sigma_rels=[0.05,0.1]", "trainer.posthoc_ema.snapshot_every=2"]


def _snapshots(run):
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted((run / "posthoc_ema").glob("step_*.safetensors"))}


@pytest.fixture(scope="module")
def posthoc_runs(tmp_path_factory):
    """A tiny DDPM trained 4 steps straight, and 2 steps then resumed to 4, both keeping two profiles."""
    from conftest import cli

    root = tmp_path_factory.mktemp("posthoc")
    straight, resumed = root / "straight", root / "resumed"
    cli("train", *TINY, "trainer.max_steps=4", "trainer.checkpoint_every=2", f"hydra.run.dir={straight}")
    cli("train", *TINY, "trainer.max_steps=2", "trainer.checkpoint_every=2", f"hydra.run.dir={resumed}")
    cli("resume", resumed, "trainer.max_steps=4")
    return straight, resumed


def test_training_writes_snapshots_and_resume_continues_the_profiles_bitwise(posthoc_runs):
    straight, resumed = posthoc_runs
    a, b = _snapshots(straight), _snapshots(resumed)
    assert list(a) == ["step_000002.safetensors", "step_000004.safetensors"] == list(b)
    for name in a:
        assert a[name].keys() == b[name].keys() and {k.split("/")[0] for k in a[name]} == {"0", "1"}
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), f"{name} differs after a resume"
    latest = straight / "checkpoints" / "step_000004" / "training_state.pt"
    assert sorted(torch.load(latest, weights_only=True)["posthoc_ema"]) == ["0.05", "0.1"]


def test_a_stored_length_is_rebuilt_exactly_and_another_differs(posthoc_runs):
    from genlab.posthoc_ema import reconstruct_named
    from genlab.run_dir import load_family

    run = posthoc_runs[0]
    stored = _snapshots(run)["step_000004.safetensors"]
    rebuilt = reconstruct_named(run / "posthoc_ema", 0.1)
    assert rebuilt.keys() == {k[2:] for k in stored if k.startswith("1/")}
    assert all(torch.equal(rebuilt[k], stored[f"1/{k}"]) for k in rebuilt)
    family, _ = load_family(run, ema_length=0.1)
    params = dict(family.unet.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in rebuilt.items())
    between = reconstruct_named(run / "posthoc_ema", 0.07)
    assert not any(torch.equal(between[k], rebuilt[k]) for k in rebuilt if rebuilt[k].numel() > 4)
    # At an earlier checkpoint only the snapshots written by then count: the step-2 profile, exactly.
    early = reconstruct_named(run / "posthoc_ema", 0.05, step=2)
    two = _snapshots(run)["step_000002.safetensors"]
    assert all(torch.equal(early[k], two[f"0/{k}"]) for k in early)


def test_sample_with_an_ema_length_and_the_eval_sweep(posthoc_runs, tmp_path):
    from conftest import cli

    run = posthoc_runs[0]
    for length in ("0.05", "0.1"):
        cli("sample", run, "--n", "4", "--ema-length", length, "--out", tmp_path / f"{length}.png")
    assert (tmp_path / "0.05.png").read_bytes() != (tmp_path / "0.1.png").read_bytes()
    result = cli("eval", run, "--sweep-ema-length", "0.05,0.1", "--n", "16")
    rows = json.loads((run / "eval" / "ema_sweep.json").read_text())["rows"]
    assert [r["ema_length"] for r in rows] == [None, 0.05, 0.1] and "post-hoc 0.05" in result.stdout
    assert rows[1]["fid_digits_cnn"] != rows[2]["fid_digits_cnn"]


def test_bad_requests_say_what_to_do(posthoc_runs, tiny_ddpm_run, tmp_path):
    from conftest import cli

    result = cli("sample", tiny_ddpm_run, "--ema-length", "0.1", check=False)
    assert result.returncode != 0 and "trainer.posthoc_ema.sigma_rels" in result.stdout + result.stderr
    result = cli("eval", posthoc_runs[0], "--sweep-ema-length", "0.05,wide", check=False)
    assert result.returncode != 0 and "comma-separated numbers" in result.stdout + result.stderr
    result = cli("sample", posthoc_runs[0], "--ema-length", "0.5", check=False)
    assert result.returncode != 0 and "EMA length" in result.stdout + result.stderr
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(posthoc_runs[0], damaged)
    (damaged / "posthoc_ema" / "step_000004.safetensors").write_bytes(b"not a snapshot")
    result = cli("sample", damaged, "--ema-length", "0.1", check=False)
    assert result.returncode != 0 and "not a post-hoc EMA snapshot" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_one_length_or_fsdp_is_refused_before_training():
    from genlab.errors import GenlabError
    from genlab.posthoc_ema import PostHocEMA

    with pytest.raises(GenlabError, match="at least two"):
        PostHocEMA([("w", torch.zeros(2))], [0.1], 10)
