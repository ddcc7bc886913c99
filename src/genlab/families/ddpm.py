"""DDPM: a diffusers UNet2DModel learns to undo Gaussian noise (Ho et al. 2020).

The scheduler owns the noise math (diffusers' DDPMScheduler); this file owns the
objective (epsilon / v / x0 prediction, optional min-SNR weighting, class dropout for
classifier-free guidance) and sampling with DDPM, DDIM or DPM-Solver++.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.training_utils import compute_snr

from genlab.errors import GenlabError
from genlab.families.base import StepRandom, batch_labels
from genlab.families.latent_diffusion import check_steps

SAMPLERS = ("ddpm", "ddim", "dpm")
# sdpa: torch's fused scaled_dot_product_attention (diffusers' default); eager: matmul, softmax, matmul.
ATTENTION = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}


class DDPM:
    """Pixel-space denoising diffusion, unconditional or class-conditional.

    Args:
        image_size, channels: image shape (from the data config).
        num_classes: label count of the data (None when unlabelled).
        conditional: train with class labels; index `num_classes` means "no class" and is
            used for `cond_dropout` of the labels, so one network gives both the
            conditional and unconditional predictions that guidance mixes.
        unet: UNet2DModel arguments (channels, block types, ...).
        num_train_timesteps, beta_schedule, prediction_type: DDPMScheduler arguments.
        min_snr_gamma: min-SNR-gamma loss weighting (Hang et al. 2023), None for plain MSE.
        sampler, sample_steps, guidance: defaults for `sample`.
        attention: sdpa | eager, the U-Net's attention implementation (see ATTENTION).
    """

    def __init__(self, image_size: int, channels: int, unet: dict[str, Any], num_classes: int | None = None,
                 conditional: bool = False, cond_dropout: float = 0.1, num_train_timesteps: int = 1000,
                 beta_schedule: str = "linear", prediction_type: str = "epsilon", min_snr_gamma: float | None = None,
                 sampler: str = "ddim", sample_steps: int | None = 50, guidance: float = 1.0,
                 attention: str = "sdpa"):
        if conditional and not num_classes:
            raise GenlabError("model.conditional=true needs labelled data (data.num_classes is null); "
                              "use data=digits or set model.conditional=false.")
        self.image_shape = (channels, image_size, image_size)
        self.ema_network = "unet"
        self.num_classes = num_classes if conditional else None
        self.conditional, self.cond_dropout = conditional, cond_dropout
        self.unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                                num_class_embeds=num_classes + 1 if conditional else None, **unet)
        if attention not in ATTENTION:
            raise GenlabError(f"model.attention={attention!r}: use one of {', '.join(ATTENTION)}")
        for module in self.unet.modules():
            if isinstance(module, Attention):
                module.set_processor(ATTENTION[attention]())
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                       prediction_type=prediction_type, clip_sample=True)
        self.min_snr_gamma = min_snr_gamma
        self.defaults = {"sampler": sampler, "steps": sample_steps, "guidance": guidance}

    # ---- the Family protocol -----------------------------------------------------------
    def networks(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet}

    def param_groups(self) -> dict[str, list[dict]]:
        return {"unet": [{"params": [p for p in self.unet.parameters() if p.requires_grad]}]}

    def phases(self, step: int) -> list[str]:
        return ["unet"]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "DDPM":
        self.unet.to(device)
        return self

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0 = batch["image"]  # (B, C, H, W) in [-1, 1]
        noise = rng.randn_like(x0)
        t = rng.randint(self.scheduler.config.num_train_timesteps, len(x0)).to(x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        labels = None
        if self.conditional:
            drop = rng.rand(len(x0)).to(x0.device) < self.cond_dropout
            labels = batch_labels(batch, self.num_classes)
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        prediction = self.unet(x_t, t, class_labels=labels).sample
        kind = self.scheduler.config.prediction_type
        target = {"epsilon": noise, "sample": x0}.get(kind)
        if target is None:  # v_prediction
            target = self.scheduler.get_velocity(x0, noise, t)
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            snr = compute_snr(self.scheduler, t)
            weight = snr.clamp(max=self.min_snr_gamma)
            weight = weight / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[kind]
            loss = (per_image * weight).mean()
        else:
            loss = per_image.mean()
        return loss, {"loss": loss.detach()}

    def _scheduler_for(self, sampler: str):
        if sampler == "ddpm":
            return DDPMScheduler.from_config(self.scheduler.config)
        if sampler == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config)
        if sampler == "dpm":
            return DPMSolverMultistepScheduler.from_config(self.scheduler.config, algorithm_type="dpmsolver++")
        raise GenlabError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")

    @torch.no_grad()
    def sample(self, n: int, seed: int, sampler: str | None = None, steps: int | None = None,
               class_label: int | None = None, guidance: float | None = None, **unknown: Any) -> torch.Tensor:
        """Generate `n` images (n, C, H, W) in [-1, 1], deterministic in `seed`.

        Args:
            sampler: ddpm | ddim | dpm (DPM-Solver++); default model.sampler.
            steps: denoising steps; default model.sample_steps (all training steps for ddpm if null).
            class_label: for conditional models; None cycles through the classes.
            guidance: classifier-free guidance scale (1 = plain conditional).
        """
        if unknown:
            raise GenlabError(f"option(s) {', '.join(unknown)} do not apply to DDPM models")
        if class_label is not None and not self.conditional:
            raise GenlabError("--class needs a conditional model (train with model.conditional=true)")
        sampler = sampler or self.defaults["sampler"]
        steps = steps or self.defaults["steps"] or self.scheduler.config.num_train_timesteps
        guidance = self.defaults["guidance"] if guidance is None else guidance
        check_steps(steps, self.scheduler.config)
        scheduler = self._scheduler_for(sampler)
        scheduler.set_timesteps(steps)
        device = next(self.unet.parameters()).device
        generator = torch.Generator().manual_seed(seed)  # CPU generator: same noise on any device
        x = torch.randn((n, *self.image_shape), generator=generator).to(device) * scheduler.init_noise_sigma
        labels = None
        if self.conditional:
            labels = torch.arange(n) % self.num_classes if class_label is None else torch.full((n,), class_label)
            labels = labels.to(device)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            if labels is not None and guidance != 1.0:
                null = torch.full_like(labels, self.num_classes)
                both = self.unet(torch.cat([model_input] * 2), t, class_labels=torch.cat([labels, null])).sample
                cond, uncond = both.chunk(2)
                out = uncond + guidance * (cond - uncond)
            else:
                out = self.unet(model_input, t, class_labels=labels).sample
            x = scheduler.step(out, t, x, generator=generator if sampler == "ddpm" else None).prev_sample
        return x.clamp(-1, 1)

    def export(self, out_dir: Path) -> None:
        """A diffusers DDPMPipeline directory (`DDPMPipeline.from_pretrained(out_dir)`)."""
        DDPMPipeline(unet=self.unet, scheduler=self.scheduler).save_pretrained(out_dir)
