"""The diffusion core (genlab.diffusion) against closed forms: targets, samplers, densities, weights."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import rng
from genlab.diffusion import Diffusion, flow_shift
from genlab.errors import ConfigError, GenlabError

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- a 1-D Gaussian mixture and its exact rectified-flow velocity ---------------------------
WEIGHTS, MEANS, STDS = torch.tensor([0.3, 0.7], dtype=torch.float64), torch.tensor([-2.0, 1.5], dtype=torch.float64), \
    torch.tensor([0.5, 0.3], dtype=torch.float64)
MIX_MEAN = (WEIGHTS * MEANS).sum()
MIX_VAR = (WEIGHTS * (STDS ** 2 + MEANS ** 2)).sum() - MIX_MEAN ** 2


def exact_velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[noise - x0 | x_s = x] for x_s = (1 - s) x0 + s noise, x0 from the mixture, noise ~ N(0, 1)."""
    x, s = x.double().flatten(), s.double().flatten()[:1]
    var = (1 - s) ** 2 * STDS ** 2 + s ** 2  # (K,) the marginal variance of each component at s
    centred = x[:, None] - (1 - s) * MEANS  # (N, K)
    log_r = torch.log(WEIGHTS) - 0.5 * torch.log(var) - centred ** 2 / (2 * var)
    r = torch.softmax(log_r, dim=1)  # posterior over components
    e_x0 = MEANS + (1 - s) * STDS ** 2 / var * centred
    e_noise = s / var * centred
    return (r * (e_noise - e_x0)).sum(1)


@pytest.mark.parametrize("sampler,steps,shift", [("euler", 100, 1.0), ("euler", 100, 3.0), ("heun", 30, 1.0)])
def test_flow_sampler_integrates_a_gaussian_mixture_to_its_moments(sampler, steps, shift):
    core = Diffusion.build(objective="flow", shift=shift)
    noise = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(0))

    def predict(x, t):  # the network's timestep is s * num_train_timesteps
        return exact_velocity(x, t / core.num_train_timesteps).view_as(x).float()

    x = core.denoise(predict, noise, sampler, steps).double().flatten()
    assert abs(x.mean() - MIX_MEAN) < 0.05 and abs(x.var() - MIX_VAR) < 0.1
    assert abs((x < 0).double().mean() - WEIGHTS[0]) < 0.02  # the mass of each mode
    assert abs(x[x > 0].std() - STDS[1]) < 0.05


def test_the_exact_velocity_is_the_flow_training_target():
    """Averaged over many draws at one noise level, the core's target is the exact velocity."""
    core = Diffusion.build(objective="flow", timesteps="logit_normal")
    x0 = torch.cat([torch.randn(60_000, 1, 1, 1) * 0.5 - 2.0, torch.randn(140_000, 1, 1, 1) * 0.3 + 1.5])
    x_t, t, target, _ = core.training_inputs(x0, rng())
    s = t / core.num_train_timesteps
    near = (s - 0.5).abs() < 0.02
    x_near, target_near = x_t[near].flatten(), target[near].flatten()
    exact = exact_velocity(x_near, torch.tensor([0.5]))
    # E[target | x_t] is the velocity: the residual's correlation with any function of x_t vanishes.
    assert abs(((target_near.double() - exact) * x_near.double()).mean()) < 0.05
    assert abs((target_near.double() - exact).mean()) < 0.05


# ---- every objective: the exact prediction has zero loss ------------------------------------
def exact_prediction(objective: str, core: Diffusion, x_t, t, x0):
    """The perfect network's output, from the closed forms (not from the core's own code)."""
    if objective == "flow":
        s = (t.double() / core.num_train_timesteps).view(-1, 1, 1, 1)
        noise = (x_t.double() - (1 - s) * x0) / s
        return noise - x0
    a = core.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    noise = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
    return {"epsilon": noise, "x0": x0.double(), "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[objective]


@pytest.mark.parametrize("objective,extra", [
    ("epsilon", {"offset_noise": 0.1}), ("v", {"weighting": "min_snr", "timesteps": "logit_normal"}),
    ("x0", {"timesteps": "cubic"}), ("flow", {"shift": 3.0, "weighting": "cosmap", "timesteps": "mode"})])
def test_each_objective_has_zero_loss_at_its_exact_target(objective, extra):
    core = Diffusion.build(objective=objective, **extra)
    x0 = torch.randn(16, 3, 4, 4)
    x_t, t, target, weight = core.training_inputs(x0, rng())
    perfect = exact_prediction(objective, core, x_t, t, x0).float()
    assert core.loss(perfect, target, weight) < 1e-6
    assert core.loss(perfect + 0.1, target, torch.ones(16)) == pytest.approx(0.01, rel=1e-3)  # a mean, not a sum
    assert weight.shape == (16,) and torch.all(weight > 0)


# ---- timestep densities against their CDFs ----------------------------------------------------
def _normal_cdf(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


CDFS = {  # closed-form CDF of the noise level (DDPM: fraction of the steps; flow: s after the shift)
    "logit_normal": lambda x: _normal_cdf((torch.log(x / (1 - x)) - 0.5) / 0.8),
    "cubic": lambda x: 1 - (1 - x) ** (1 / 3),
    "uniform": lambda x: x,
    "uniform_shift3": lambda x: x / (3 - 2 * x),  # s = 3u / (1 + 2u)  <=>  u = s / (3 - 2s)
}


@pytest.mark.parametrize("name", sorted(CDFS))
def test_noise_level_histograms_follow_their_densities(name):
    timesteps = name.split("_shift")[0]
    core = Diffusion.build(objective="flow", timesteps=timesteps, logit_mean=0.5, logit_std=0.8,
                           shift=3.0 if "shift" in name else 1.0)
    _, t, _, _ = core.training_inputs(torch.zeros(40_000, 1, 1, 1), rng())
    s = (t / core.num_train_timesteps).double()
    edges = torch.linspace(0, 1, 21, dtype=torch.float64)
    observed = torch.histc(s, bins=20, min=0, max=1) / len(s)
    cdf = CDFS[name](edges.clamp(1e-12, 1 - 1e-12))
    expected = cdf[1:] - cdf[:-1]
    assert (observed - expected).abs().max() < 0.01, (observed, expected)


def test_flow_shift_is_the_schedulers_own():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = torch.linspace(1, 1 / 1000, 1000)
    assert torch.allclose(scheduler.sigmas, flow_shift(unshifted, 3.0), atol=1e-6)


# ---- loss weightings against their closed forms --------------------------------------------------
@pytest.mark.parametrize("objective", ["epsilon", "v", "x0"])
def test_min_snr_weights_match_the_closed_form(objective):
    core = Diffusion.build(objective=objective, schedule="linear", weighting="min_snr", snr_gamma=5.0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # Ho et al.'s linear schedule
    alpha_bar = torch.cumprod(1 - betas, 0)
    snr = alpha_bar / (1 - alpha_bar)
    clamped = snr.clamp(max=5.0)
    expected = {"epsilon": clamped / snr, "v": clamped / (snr + 1), "x0": clamped}[objective]
    t = torch.arange(1000)
    assert torch.allclose(core.ddpm_weight(t).double(), expected, rtol=1e-3)  # fp32 schedule


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap", "none"])
def test_flow_weights_match_the_closed_form(weighting):
    core = Diffusion.build(objective="flow", weighting=weighting)
    _, t, _, weight = core.training_inputs(torch.zeros(1000, 1, 1, 1), rng())
    s = t.double() / 1000
    expected = {"sigma_sqrt": s ** -2, "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)),
                "none": torch.ones_like(s)}[weighting]
    assert torch.allclose(weight.double(), expected, rtol=1e-4)


# ---- what fits an objective is refused in one sentence otherwise ---------------------------------
def test_samplers_and_weightings_fit_the_objective():
    flow, ddpm = Diffusion.build(objective="flow"), Diffusion.build(objective="v")
    assert flow.samplers() == ("euler", "heun") and ddpm.samplers() == ("ddpm", "ddim", "dpm", "unipc")
    assert [s for s, _ in flow.comparison()] == ["euler"] * 4 + ["heun"] * 2
    with pytest.raises(GenlabError, match="objective flow samples with euler, heun"):
        flow.inference_scheduler("ddim")
    with pytest.raises(GenlabError, match="samples with ddpm, ddim, dpm, unipc"):
        ddpm.check_sampler("euler")
    with pytest.raises(ConfigError, match="use one of none, sigma_sqrt, cosmap"):
        Diffusion.build(objective="flow", weighting="min_snr")
    with pytest.raises(ConfigError, match="needs model.objective=v"):
        Diffusion.build(objective="epsilon", zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="epsilon, v, x0, flow"):
        Diffusion.build(objective="v_prediction")
    zero = Diffusion.build(objective="v", zero_terminal_snr=True)
    assert zero.scheduler.alphas_cumprod[-1] < 1e-8  # the last step is pure noise


def test_offset_noise_shifts_each_channel_as_a_whole():
    """Channel means of the noise vary by offset^2 + 1/(H W): the offset reaches the noise the target holds."""
    x0 = torch.zeros(4000, 3, 4, 4)
    for offset, expected in ((0.0, 1 / 16), (0.5, 0.25 + 1 / 16)):
        _, _, noise, _ = Diffusion.build(offset_noise=offset).training_inputs(x0, rng())
        assert noise.mean(dim=(2, 3)).var().item() == pytest.approx(expected, rel=0.1)


def test_runs_saved_before_the_core_still_load():
    """Their configs say prediction_type / beta_schedule / min_snr_gamma: translated, not refused."""
    from genlab.families.ddpm import DDPM

    old = DDPM(8, 1, dict(block_out_channels=[8, 8], down_block_types=["DownBlock2D", "DownBlock2D"],
                          up_block_types=["UpBlock2D", "UpBlock2D"], norm_num_groups=4, attention_head_dim=8),
               prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", min_snr_gamma=5.0)
    assert (old.diffusion.objective, old.diffusion.weighting, old.diffusion.snr_gamma) == ("v", "min_snr", 5.0)
    assert old.diffusion.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    plain = Diffusion.build(prediction_type="epsilon", beta_schedule="linear", min_snr_gamma=None)
    assert (plain.objective, plain.weighting) == ("epsilon", "none")
