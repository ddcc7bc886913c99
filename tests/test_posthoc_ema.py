"""Post-hoc EMA (train/posthoc_ema.py): the power-function profiles and their reconstruction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genlab.train.posthoc_ema import (PowerEMA, gamma_of, profile_dot, reconstruct, reconstruction_weights,
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
