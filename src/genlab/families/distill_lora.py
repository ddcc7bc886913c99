"""LCM-LoRA (Luo et al. 2023): consistency distillation of an SD-style base into a LoRA, `model=distill model.lora_rank=R`.

The student is the base's own U-Net with a peft LoRA (`families.sd.StableDiffusion` with `model.base` = the
teacher), and the teacher is the same U-Net with the adapter switched off, so nothing is held twice. Each
step noises a data latent to x_t on LCM's skipping-step grid, the teacher takes one DDIM step with its
classifier-free guidance (captions against ""), and the student's consistency function is trained to give
at x_t what it gives (without gradient) one step on; the math is `families.consistency`'s. The export is the
SD pipeline with the LoRA merged and LCMScheduler as its scheduler, plus `pytorch_lora_weights.safetensors`,
which `StableDiffusionPipeline.load_lora_weights` reads onto the base with an LCMScheduler.
"""

from __future__ import annotations

from typing import Any

import torch

from genlab.data.latent_cache import cached_or_encoded_latents, cached_or_encoded_text
from genlab.errors import ConfigError
from genlab.families.consistency import ConsistencyDiffusion, consistency_output, ddim_step, lcm_timesteps
from genlab.families.sd import StableDiffusion
from genlab.run_dir import RunDir
from genlab.step_random import StepRandom


def base_of(teacher: str) -> str:
    """The teacher as an SD base: a genlab sd run (its config checked like `genlab sample` checks one) or a
    diffusers SD directory / hub id, which `StableDiffusion` itself checks."""
    run = RunDir(teacher)
    if run.is_run():
        model = run.read_config().model
        if "families.sd." not in str(model.get("_target_")) or model.get("backbone", "unet") != "unet":
            raise ConfigError(f"model.teacher={teacher} is not a U-Net sd run; model.lora_rank > 0 (LCM-LoRA) "
                              "distils an SD-style base (a genlab sd run or an SD 1.x/2.x pipeline).")
        if model.get("objective") == "flow":
            raise ConfigError(f"model.teacher={teacher} was trained by rectified flow; LCM-LoRA needs an epsilon / v "
                              "base (a flow base needs reflow, which is built for ddpm runs only).")
    return teacher


class LCMLoRA(StableDiffusion):
    """An SD base's U-Net + a LoRA trained by latent consistency distillation (see the module docstring).

    Args:
        teacher: the base (genlab sd run, diffusers SD directory or hub id).
        lora_rank: the adapter's rank (alpha = rank).
        guidance: the teacher's classifier-free guidance in the DDIM step (null: 5.0, SD's usual; LCM
            trains with 3-15); the student samples without guidance on top.
        sample_steps, lcm_steps: as for `Distill` (LCMScheduler's steps; its original_inference_steps).
        image_size, channels, validation_data: the data's (default prompts: its first val captions).
        **unused: model=distill's keys for reflow (pool_size, grid_steps, ...), which do not apply here.
    """

    def __init__(self, teacher: str, image_size: int, channels: int, lora_rank: int, guidance: float | None = None,
                 sample_steps: int = 2, lcm_steps: int = 50, validation_data: Any = None, **unused: Any):
        super().__init__(image_size, channels, base=base_of(str(teacher)), lora={"rank": lora_rank},
                         train_text_encoder=False, caption_dropout=0.0, sample_steps=sample_steps, guidance=1.0,
                         validation_data=validation_data)
        self.teacher_dir, self.method = str(teacher), "lcm"
        self.teacher_guidance = 5.0 if guidance is None else guidance
        self.teacher_diffusion = self.diffusion
        self.diffusion = ConsistencyDiffusion.of(self.diffusion, lcm_steps)
        self.sampler_name = "lcm"
        self.diffusion.check_steps(sample_steps)

    @torch.no_grad()
    def teacher_step(self, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, text: torch.Tensor,
                     empty: torch.Tensor) -> torch.Tensor:
        """The base U-Net (the adapter off) with its guidance, one DDIM step from x_t to x_{t_prev}."""
        unet = self.unet
        bare = getattr(unet, "module", unet)  # the adapter switch is on the U-Net, not on a DDP wrapper
        bare.disable_adapters()
        try:
            both = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([text, empty])).sample
        finally:
            bare.enable_adapters()
        cond, uncond = both.chunk(2)
        out = uncond + self.teacher_guidance * (cond - uncond)
        return ddim_step(self.diffusion.scheduler.alphas_cumprod, self.diffusion.objective, out, x_t, t,
                         t_prev).to(x_t.dtype)

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents = cached_or_encoded_latents(batch, self.vae, rng)
        n, device, scheduler = len(latents), latents.device, self.diffusion.scheduler
        with torch.no_grad():
            text = cached_or_encoded_text(batch, batch["caption"], self.tokenizer, self.text_encoder)
            empty = cached_or_encoded_text(batch, [""] * n, self.tokenizer, self.text_encoder)
        t, t_prev = lcm_timesteps(scheduler, n, rng, device)
        x_t = scheduler.add_noise(latents, rng.randn_like(latents), t)
        unet, objective = self.unet, self.diffusion.objective
        with torch.no_grad():
            x_prev = self.teacher_step(x_t, t, t_prev, text, empty)
            target = consistency_output(scheduler, objective, unet(x_prev, t_prev, encoder_hidden_states=text).sample,
                                        x_prev, t_prev)
        online = consistency_output(scheduler, objective, unet(x_t, t, encoder_hidden_states=text).sample, x_t, t)
        loss = self.diffusion.loss(online, target, torch.ones(n, device=device))
        return loss, {"loss": loss.detach()}
