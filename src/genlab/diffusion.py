"""The diffusion core shared by every diffusion family (ddpm, sd, sd3, controlnet).

diffusers' schedulers own the noise math (`DDPMScheduler.add_noise`, `get_velocity`, every
sampler's `step`) and `diffusers.training_utils` owns the timestep densities and loss
weightings of SD3 and min-SNR; this module picks and combines them, so a family only
says which network predicts and on what it is conditioned:

    diffusion = Diffusion.build(objective="flow", timesteps="logit_normal", ...)  # model.* keys
    x_t, t, target, weight = diffusion.training_inputs(x0, rng)
    loss = diffusion.loss(net(x_t, t, ...), target, weight)
    images = diffusion.denoise(predict, noise, sampler="euler", steps=8)

Objectives (`model.objective`):
- epsilon, v, x0: a DDPM noise schedule (`model.schedule` linear | cosine | scaled_linear,
  optionally rescaled to zero terminal SNR); the network predicts the noise, the velocity
  sqrt(a) eps - sqrt(1-a) x0, or the clean image.
- flow: rectified flow (SD3, Flux, SiT): x_t = (1 - s) x0 + s noise on the straight path,
  the network predicts the velocity noise - x0; `model.shift` > 1 moves the noise levels
  up (SD3 uses 3.0 at 1024 px). The network's timestep is s * num_train_timesteps, as
  diffusers' flow schedulers and SD3/Flux transformers expect.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr

from genlab.errors import ConfigError, GenlabError
from genlab.step_random import StepRandom
OBJECTIVES = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample", "flow": None}
#: model.schedule -> diffusers' beta_schedule (DDPM objectives).
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
TIMESTEPS = ("uniform", "logit_normal", "mode", "cubic")
#: Samplers and loss weightings per kind of objective: what `--sampler` and model.weighting accept.
SAMPLERS = {
    "ddpm": {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler,
             "unipc": UniPCMultistepScheduler},
    "flow": {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler},
}
#: Samplers whose step draws noise from the sampling generator (LCM: a distilled student's, families.distill).
STOCHASTIC = ("ddpm", "lcm")
#: The sampler used when model.sampler is null.
DEFAULT_SAMPLER = {"ddpm": "unipc", "flow": "euler"}
WEIGHTINGS = {"ddpm": ("none", "min_snr"), "flow": ("none", "sigma_sqrt", "cosmap")}
#: `genlab eval --compare-samplers`: (sampler, steps) per kind; "all" = every training step.
COMPARISON = {
    "ddpm": (("ddpm", "all"), ("ddim", 50), ("ddim", 20), ("ddim", 10), ("dpm", 20), ("dpm", 10)),
    "flow": (("euler", 50), ("euler", 16), ("euler", 8), ("euler", 4), ("heun", 8), ("heun", 4)),
}


def make_scheduler(objective: str = "epsilon", schedule: str = "linear", num_train_timesteps: int = 1000,
                   zero_terminal_snr: bool = False, shift: float = 1.0, clip_sample: bool = False,
                   steps_offset: int = 0):
    """The training scheduler for an objective: DDPMScheduler, or FlowMatchEulerDiscreteScheduler for flow.

    Args:
        clip_sample: clip predicted x0 to [-1, 1] in DDPM-family samplers (pixels: yes; latents: no).
        steps_offset: 1 is what SD pipelines expect of their schedulers (no FutureWarning).
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"model.objective={objective!r}: use one of {', '.join(OBJECTIVES)}.")
    if objective == "flow":
        if not shift > 0:
            raise ConfigError(f"model.shift={shift!r} must be > 0 (1.0 = no shift; SD3 uses 3.0).")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    if schedule not in SCHEDULES:
        raise ConfigError(f"model.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}.")
    if zero_terminal_snr and objective == "epsilon":
        # At SNR 0 the noisy input *is* the noise: x0 = (x_T - sqrt(1-a) eps) / sqrt(a) divides by zero.
        raise ConfigError("model.zero_terminal_snr=true needs model.objective=v (or x0): epsilon cannot "
                          "recover the image at zero signal.")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=SCHEDULES[schedule],
                         prediction_type=OBJECTIVES[objective], rescale_betas_zero_snr=zero_terminal_snr,
                         # Zero terminal SNR is only reached if sampling starts at the last step (Lin et al. 2024).
                         timestep_spacing="trailing" if zero_terminal_snr else "leading",
                         clip_sample=clip_sample, steps_offset=steps_offset)


def objective_of(scheduler) -> str:
    """The objective a training scheduler trains (a pretrained base's scheduler says it)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "flow"
    by_type = {v: k for k, v in OBJECTIVES.items() if v}
    return by_type[scheduler.config.prediction_type]


class Diffusion:
    """An objective on a schedule, its timestep sampling, loss weighting and samplers.

    Args:
        scheduler: the training scheduler (`make_scheduler`, or a pretrained base's).
        timesteps: uniform | logit_normal (SD3) | mode (SD3) | cubic (mostly high noise, where the
            layout of an image is decided: T2I-Adapter's choice for structure control).
        weighting: none | min_snr (DDPM objectives, Hang et al. 2023) | sigma_sqrt | cosmap (flow, SD3).
        snr_gamma: min-SNR's gamma.
        offset_noise: std of a per-image, per-channel constant added to the noise, so the model
            can change an image's mean brightness (Guttenberg 2023); 0 = off.
        logit_mean, logit_std, mode_scale: parameters of the logit_normal and mode densities.
    """

    def __init__(self, scheduler, timesteps: str = "uniform", weighting: str = "none", snr_gamma: float = 5.0,
                 offset_noise: float = 0.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        self.scheduler = scheduler
        self.objective = objective_of(scheduler)
        self.kind = "flow" if self.objective == "flow" else "ddpm"
        if timesteps not in TIMESTEPS:
            raise ConfigError(f"model.timesteps={timesteps!r}: use one of {', '.join(TIMESTEPS)}.")
        if weighting not in WEIGHTINGS[self.kind]:
            raise ConfigError(f"model.weighting={weighting!r} does not fit model.objective={self.objective}: "
                              f"use one of {', '.join(WEIGHTINGS[self.kind])}.")
        self.timesteps, self.weighting, self.snr_gamma = timesteps, weighting, snr_gamma
        self.offset_noise = offset_noise
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    @classmethod
    def build(cls, scheduler=None, objective: str = "epsilon", schedule: str = "linear",
              num_train_timesteps: int = 1000, zero_terminal_snr: bool = False, shift: float = 1.0,
              clip_sample: bool = False, steps_offset: int = 0, **sampling) -> "Diffusion":
        """A Diffusion from the model.* keys; `scheduler` (a pretrained base's) replaces the schedule keys.

        Runs saved before the core (model.prediction_type, beta_schedule, min_snr_gamma) still load:
        their keys are translated (see `upgrade_keys`).
        """
        sampling, old = upgrade_keys(sampling)
        objective, schedule = old.get("objective", objective), old.get("schedule", schedule)
        scheduler = scheduler or make_scheduler(objective, schedule, num_train_timesteps, zero_terminal_snr, shift,
                                                clip_sample, steps_offset)
        return cls(scheduler, **sampling)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    # ---- training ----------------------------------------------------------------------
    def noise_levels(self, n: int, rng: StepRandom, device: torch.device) -> torch.Tensor:
        """(n,) noise levels u in [0, 1): 0 = clean, 1 = pure noise, drawn from `model.timesteps`."""
        if self.timesteps == "cubic":
            return 1 - rng.rand(n).to(device) ** 3
        # diffusers' SD3 densities, drawn for the global batch so any split over processes draws the same.
        u = rng.draw(n, lambda m, generator: compute_density_for_timestep_sampling(
            self.timesteps, m, self.logit_mean, self.logit_std, self.mode_scale, rng.device, generator))
        return u.to(device)

    def training_inputs(self, x0: torch.Tensor, rng: StepRandom
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target, weight) for clean images or latents x0 (B, C, H, W).

        t is what the network takes as its timestep: integer steps for DDPM objectives,
        s * num_train_timesteps (float) for flow. weight (B,) is the per-item loss weight.
        """
        noise = rng.randn_like(x0)
        n, total = len(x0), self.num_train_timesteps
        if self.kind == "ddpm" and self.timesteps == "uniform":
            t = rng.randint(total, n).to(x0.device)  # every step equally often, as in Ho et al.
        else:
            u = self.noise_levels(n, rng, x0.device)
        if self.offset_noise:
            noise = noise + self.offset_noise * rng.randn(n, x0.shape[1], *([1] * (x0.dim() - 2))).to(x0.device)
        if self.kind == "flow":
            # At least the scheduler's smallest noise level (1 / T): sigma_sqrt's 1 / s^2 stays finite.
            s = flow_shift(u, self.scheduler.config.shift).clamp(min=1 / total)
            s_ = s.view(-1, *([1] * (x0.dim() - 1)))
            x_t = (1 - s_) * x0 + s_ * noise
            weight = compute_loss_weighting_for_sd3(self.weighting, s)
            return x_t, s * total, noise - x0, weight
        if self.timesteps != "uniform":
            t = (u * total).long().clamp(0, total - 1)
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = {"epsilon": noise, "x0": x0}.get(self.objective)
        if target is None:  # v
            target = self.scheduler.get_velocity(x0, noise, t)
        return x_t, t, target, self.ddpm_weight(t)

    def ddpm_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) loss weights of a DDPM objective at integer timesteps t."""
        if self.weighting == "none":
            return torch.ones(len(t), device=t.device)
        # Min-SNR-gamma: weight each step as an x0 loss clamped at gamma, min(SNR, gamma), then
        # divide by what the objective's MSE already carries (eps: SNR, v: SNR + 1, x0: 1).
        snr = compute_snr(self.scheduler, t)
        carried = {"epsilon": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[self.objective]
        return snr.clamp(max=self.snr_gamma) / carried

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Weighted MSE: the mean over each item, weighted, then the mean over the batch (fp32)."""
        per_item = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (per_item * weight).mean()

    # ---- sampling -------------------------------------------------------------------------
    def samplers(self) -> tuple[str, ...]:
        return tuple(SAMPLERS[self.kind])

    def default_sampler(self) -> str:
        return DEFAULT_SAMPLER[self.kind]

    def check_sampler(self, name: str) -> str:
        """`name` if it fits the objective, else a GenlabError listing what does."""
        if name not in SAMPLERS[self.kind]:
            raise GenlabError(f"--sampler {name}: a model trained with objective {self.objective} samples with "
                              f"{', '.join(self.samplers())}.")
        return name

    def check_steps(self, steps: int) -> int:
        """Sampling steps between 1 and the training steps, or a GenlabError saying so."""
        total = self.num_train_timesteps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= total:
            raise GenlabError(f"--steps {steps}: use 1 to {total} (the model was trained on {total} noise levels).")
        return steps

    def inference_scheduler(self, name: str):
        """A fresh sampler of kind `name` on the training schedule (and shift), for any diffusers pipeline."""
        scheduler = SAMPLERS[self.kind][self.check_sampler(name)].from_config(self.scheduler.config)
        return for_unet_pipelines(scheduler) if self.kind == "flow" else scheduler

    def comparison(self) -> list[tuple[str, int]]:
        """(sampler, steps) settings for `genlab eval --compare-samplers`."""
        return [(name, self.num_train_timesteps if steps == "all" else steps) for name, steps in COMPARISON[self.kind]]

    @torch.no_grad()
    def denoise(self, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                sampler: str, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Integrate from `noise` to data with a diffusers sampler; the loop of DDPMPipeline.

        Every sampler here starts at noise of std 1 and has an identity `scale_model_input`, so,
        like DDPMPipeline, the loop calls neither. `predict(x, t)` is the network, with any
        guidance inside (see `guided`); t is expanded to the batch.
        """
        scheduler = self.inference_scheduler(sampler)
        scheduler.set_timesteps(self.check_steps(steps))
        x = noise
        for t in scheduler.timesteps:
            out = predict(x, t.expand(len(x)).to(x.device))
            # Only DDPM's ancestral step (and LCM's, families.distill) draws noise; UniPC's takes no generator.
            extra = {"generator": generator} if sampler in STOCHASTIC else {}
            x = scheduler.step(out, t, x, **extra).prev_sample
        return x


def for_unet_pipelines(scheduler):
    """`scheduler` (a flow sampler) made drivable by StableDiffusion(ControlNet)Pipeline; returned for chaining.

    Those pipelines multiply the starting noise by `scheduler.init_noise_sigma` and pass each U-Net
    input through `scheduler.scale_model_input`, which flow schedulers lack because rectified flow
    needs neither: it starts from noise of std 1 and feeds the network x_t as it is. So 1.0 and the
    identity are exact. They are set on the instance, not in a subclass, so an export's scheduler
    stays a plain diffusers class; the loading code for a flow SD export (docs/guide/text-to-image.md) sets the same two.
    """
    scheduler.init_noise_sigma = 1.0
    scheduler.scale_model_input = lambda sample, timestep=None: sample
    return scheduler


def upgrade_keys(keys: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keys without the pre-core names, {objective, schedule} they meant) for runs saved before the core.

    The old min_snr_gamma (null = off) becomes weighting=min_snr + snr_gamma.
    """
    keys, old = dict(keys), {}
    if "prediction_type" in keys:
        old["objective"] = {v: k for k, v in OBJECTIVES.items() if v}.get(keys.pop("prediction_type"))
    if "beta_schedule" in keys:
        old["schedule"] = {v: k for k, v in SCHEDULES.items()}.get(keys.pop("beta_schedule"))
    if "min_snr_gamma" in keys:
        gamma = keys.pop("min_snr_gamma")
        keys.update({"weighting": "min_snr", "snr_gamma": gamma} if gamma else {})
    return keys, {k: v for k, v in old.items() if v}


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): any objective's prediction is linear in the score."""
    return uncond + scale * (cond - uncond)


def flow_shift(u: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The SD3/Flux time shift s = shift u / (1 + (shift - 1) u): FlowMatchEulerDiscreteScheduler's on its sigmas."""
    return shift * u / (1 + (shift - 1) * u)

