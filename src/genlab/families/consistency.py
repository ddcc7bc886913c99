"""Latent consistency (LCM, Luo et al. 2023) math shared by model=distill's lcm students: the skipping-step
grid, LCMScheduler's consistency function, the teacher's DDIM step, and a diffusion core sampled by LCMScheduler."""

from __future__ import annotations

import inspect

import torch
from diffusers import LCMScheduler

from genlab.diffusion import Diffusion
from genlab.errors import GenlabError
from genlab.step_random import StepRandom


#: LCMScheduler's own config keys.
LCM_KEYS = frozenset(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}


class ConsistencyDiffusion(Diffusion):
    """The teacher's DDPM schedule sampled by diffusers' LCMScheduler (`--sampler lcm`): an LCM student's core.

    Its scheduler is an LCMScheduler on the teacher's betas, so the export's scheduler/ is one too and
    `DDPMPipeline` samples the student as LCM does.
    """

    @classmethod
    def of(cls, teacher: Diffusion, lcm_steps: int) -> "ConsistencyDiffusion":
        # Only LCMScheduler's own keys: a base's export may carry its sampler's (UniPC's) in the config.
        keys = {k: v for k, v in teacher.scheduler.config.items() if k in LCM_KEYS}
        scheduler = LCMScheduler.from_config({**keys, "original_inference_steps": lcm_steps})
        found = cls(scheduler, weighting="none")
        found.objective, found.kind = teacher.objective, teacher.kind
        return found

    def samplers(self) -> tuple[str, ...]:
        return ("lcm",)

    def default_sampler(self) -> str:
        return "lcm"

    def check_sampler(self, name: str) -> str:
        if name != "lcm":
            raise GenlabError(f"--sampler {name}: a consistency-distilled student samples with lcm only.")
        return name

    def check_steps(self, steps: int) -> int:
        most = self.scheduler.config.original_inference_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= most:
            raise GenlabError(f"--steps {steps}: use 1 to {most} (the student was distilled on {most} LCM steps; 1-4 is what it is for).")
        return steps

    def inference_scheduler(self, name: str):
        return LCMScheduler.from_config(self.scheduler.config) if self.check_sampler(name) else None

    def comparison(self) -> list[tuple[str, int]]:
        return [("lcm", 1), ("lcm", 2), ("lcm", 4)]


def image_and_noise(objective: str, alphas: torch.Tensor, out: torch.Tensor, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise) that a network's output `out` at x_t = sqrt(a) x0 + sqrt(1 - a) noise stands for."""
    a, b = alphas.sqrt(), (1 - alphas).sqrt()
    if objective == "epsilon":
        return (x - b * out) / a, out
    if objective == "v":
        return a * x - b * out, a * out + b * x
    return out, (x - a * out) / b  # x0


def lcm_timesteps(scheduler: LCMScheduler, n: int, rng: StepRandom, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, t - k) for n items: a random point of LCM's skipping-step grid (k - 1, 2k - 1, ..., T - 1) and
    the one before it (0 for the first: there the consistency function is the identity)."""
    steps = scheduler.config.original_inference_steps
    k = scheduler.config.num_train_timesteps // steps
    t = (rng.randint(steps, n).to(device) + 1) * k - 1
    return t, (t - k).clamp(min=0)


def consistency_output(scheduler: LCMScheduler, objective: str, out: torch.Tensor, x: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
    """f(x, t) = c_skip x + c_out x0(out): what LCMScheduler.step makes of a network output (f(x, 0) = x)."""
    alphas = scheduler.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
    c_skip, c_out = (c.view(-1, 1, 1, 1) for c in scheduler.get_scalings_for_boundary_condition_discrete(t))
    return c_skip * x + c_out * image_and_noise(objective, alphas, out.float(), x)[0]


def ddim_step(alphas_cumprod: torch.Tensor, objective: str, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
              t_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step of a network output from x_t to x_{t_prev}: the teacher's ODE solver."""
    alphas = alphas_cumprod.to(x.device)
    image, noise = image_and_noise(objective, alphas[t].view(-1, 1, 1, 1), out.float(), x)
    a_prev = alphas[t_prev].view(-1, 1, 1, 1)
    return a_prev.sqrt() * image + (1 - a_prev).sqrt() * noise
