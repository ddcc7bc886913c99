"""Few-step distillation of a finished genlab diffusion run (issue 32): `genlab train model=distill model.teacher=RUN`.

Reflow (rectified-flow distillation, Liu et al. 2023, "InstaFlow" / "2-rectified flow"): the frozen
teacher (a `ddpm` run trained with model.objective=flow) solves its ODE from noise z to an image x0 with
its own sampler, steps, class label and guidance. Such a pair (z, x0) is a *coupling*: the teacher's
paths between them curve, the straight line between them does not. The student, started from the
teacher's weights (EMA ones where the run has them), learns the velocity z - x0 on that straight line,
so one Euler step from z lands on the teacher's x0. Couplings are drawn once into a pool
(model.pool_size) or fresh every step (pool_size 0).

Consistency distillation (LCM, Luo et al. 2023) for teachers of the DDPM objectives (epsilon, v, x0):
a data image is noised to x_t on LCM's skipping-step grid (model.lcm_steps points), the teacher takes one
DDIM step (with its guidance) to x_{t-k}, and the student's consistency function f(x, t) = c_skip x +
c_out x0(x, t), with diffusers' LCMScheduler's boundary scalings, is trained to give at x_t what it gives
(without gradient) at x_{t-k}. It samples with LCMScheduler (`--sampler lcm`, 1-4 steps).

The student is a `DDPM` family like its teacher: it samples, checkpoints and exports exactly as the
teacher does (a DDPMPipeline directory for a U-Net, transformer/ + scheduler/ for a DiT), only at 1-4
steps. The teacher's config and weights are read like `genlab sample` reads a run (the `_target_`
allowlist, safetensors, no pickles). LCM-LoRA of SD-style bases (model.lora_rank > 0) is
`families.distill_lora`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch

from genlab.diffusion import guided
from genlab.errors import ConfigError, GenlabError
from genlab.families.consistency import ConsistencyDiffusion, consistency_output, ddim_step, lcm_timesteps
from genlab.families.contract import Card, OnePhase, batch_labels
from genlab.families.ddpm import DDPM
from genlab.run_dir import load_family
from genlab.step_random import StepRandom

#: model.method -> the teacher objectives it distils.
METHODS = {"reflow": ("flow",), "lcm": ("epsilon", "v", "x0")}


def load_teacher(teacher: str) -> DDPM:
    """The frozen teacher of run `teacher` (its EMA weights where it has them), or one sentence saying why not."""
    try:
        family, _ = load_family(teacher, "latest", use_ema=True, device="cpu")
    except GenlabError as error:
        raise type(error)(f"model.teacher={teacher} is not a genlab run to distil: {error}") from None
    if not isinstance(family, DDPM):
        raise ConfigError(f"model.teacher={teacher} is a {getattr(family, 'name', type(family).__name__)} run; "
                          "distillation takes a ddpm run (U-Net or DiT, e.g. experiment=flow_digits).")
    for p in family.denoiser.parameters():
        p.requires_grad_(False)
    family.denoiser.eval()
    return family


def _student_network(name: str) -> property:
    """The student's denoiser as `family.<name>`: the loop replaces it there by its wrapped module."""
    return property(lambda self: getattr(self.student, name), lambda self, net: setattr(self.student, name, net))


class Distill(OnePhase):
    """A few-step student of a genlab diffusion run.

    Args:
        teacher: the teacher's run directory (a `ddpm` run with model.objective=flow for reflow).
        image_size, channels: the data's (must be the teacher's: evaluation compares with this data).
        method: reflow (flow teachers) | lcm (consistency distillation: epsilon / v / x0 teachers).
        teacher_sampler, teacher_steps, guidance: how the teacher solves for the couplings (null: the teacher's
            model.sampler, model.sample_steps, model.guidance).
        pool_size: couplings drawn once, at the first step, and reused (0: fresh couplings every step).
        pool_batch: images per teacher call while filling the pool.
        seed: the pool's seed (the run's trainer.seed: the same pool on resume and on every process).
        grid_steps, grid_fraction: that fraction of the training noise levels is drawn from the points
            where Euler at these step counts evaluates the student (see `noise_levels`).
        sample_steps: default steps of `sample` and the grids (Euler, or LCM's).
        lcm_steps: method=lcm: the skipping-step grid, LCMScheduler's original_inference_steps (50 as in LCM).
        validation_data: the data config: LCM-LoRA's default prompts (`distill_lora`); unused here.
    """

    name = "distill"
    card = Card(what="a few-step student distilled from a genlab diffusion run (diffusers UNet2DModel + "
                     "FlowMatchEulerDiscreteScheduler for reflow, LCMScheduler for lcm)", title="Distilled DDPM",
                library_name="diffusers", pipeline_tag="unconditional-image-generation",
                tags=("diffusers", "distillation", "rectified-flow", "diffusers:DDPMPipeline"),
                use='from diffusers import DDPMPipeline\n\npipe = DDPMPipeline.from_pretrained("{where}")\n'
                    "images = pipe(batch_size=16, num_inference_steps=2).images  # 1-4 steps")
    lora_card = Card(what="an LCM-LoRA: a Stable Diffusion pipeline with the LoRA merged and an LCMScheduler, and "
                          "the LoRA alone in pytorch_lora_weights.safetensors", title="LCM-LoRA",
                     library_name="diffusers", pipeline_tag="text-to-image",
                     tags=("diffusers", "lcm", "lora", "text-to-image", "diffusers:StableDiffusionPipeline"),
                     use="from diffusers import LCMScheduler, StableDiffusionPipeline\n\n"
                         'pipe = StableDiffusionPipeline.from_pretrained("BASE")\n'
                         "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
                         'pipe.load_lora_weights("{where}")\n'
                         'image = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0).images[0]')
    losses = ("loss",)
    metrics: dict[str, str] = {}

    @classmethod
    def card_for(cls, model: Mapping[str, Any], export: Mapping[str, Any] | None = None) -> Card:
        """The teacher's card (U-Net or DiT, conditional or not: genlab_export.json says), noting the few steps."""
        from dataclasses import replace

        if model.get("lora_rank"):  # LCM-LoRA (families.distill_lora): an SD pipeline and its LoRA
            return replace(cls.lora_card, notes=(f"LCM-LoRA of rank {model['lora_rank']} distilled from {model.get('teacher')}.",))
        teacher = dict((export or {}).get("teacher_model") or {})
        if not teacher:
            return cls.card

        card = DDPM.card_for(teacher)
        note = (f"Distilled by {model.get('method', 'reflow')} from a genlab run for 1-4 sampling steps "
                "(`num_inference_steps=2` or `scheduler.set_timesteps(2)`); the teacher's guidance is built in.")
        return replace(card, title=cls.card.title, what=f"{cls.card.what.split(' (')[0]}: {card.what}",
                       notes=(*card.notes, note))

    ema_network: str | None
    unet = _student_network("unet")
    transformer = _student_network("transformer")

    def __init__(self, teacher: str, image_size: int, channels: int, method: str = "reflow",
                 teacher_sampler: str | None = None, teacher_steps: int | None = None, guidance: float | None = None,
                 pool_size: int = 4096, pool_batch: int = 256, seed: int = 0, grid_steps: tuple[int, ...] = (1, 2, 4),
                 grid_fraction: float = 0.5, sample_steps: int = 2, lcm_steps: int = 50,
                 validation_data: Any = None):
        if method not in METHODS:
            raise ConfigError(f"model.method={method!r}: use one of {', '.join(METHODS)}.")
        if not 0 <= grid_fraction <= 1:
            raise ConfigError(f"model.grid_fraction={grid_fraction!r} must be between 0 and 1.")
        self.teacher_dir, self.method = str(teacher), method
        self.teacher = load_teacher(self.teacher_dir)
        objective = self.teacher.diffusion.objective
        if objective not in METHODS[method]:
            fits = next(m for m, objectives in METHODS.items() if objective in objectives)
            raise ConfigError(f"model.teacher={teacher} was trained with objective {objective}; model.method={method} "
                              f"needs a teacher of objective {' / '.join(METHODS[method])}: use model.method={fits}.")
        if self.teacher.image_shape != (channels, image_size, image_size):
            c, s, _ = self.teacher.image_shape
            raise ConfigError(f"model.teacher={teacher} makes {c} x {s} x {s} images but the data gives {channels} x "
                              f"{image_size} x {image_size}; train on the teacher's data (data.image_size={s}, "
                              f"data.channels={c}).")
        t = self.teacher.defaults
        self.solve = {"sampler": self.teacher.diffusion.check_sampler(teacher_sampler or t["sampler"]),
                      "steps": self.teacher.diffusion.check_steps(teacher_steps or t["steps"]),
                      "guidance": t["guidance"] if guidance is None else guidance}
        # The student is the teacher's family with a trainable copy of its (EMA) weights: same
        # network, schedule, sampling and export; it samples with Euler (reflow) or LCMScheduler (lcm),
        # and no guidance on top of the guidance its training targets already hold.
        self.student = copy.deepcopy(self.teacher)
        for p in self.student.denoiser.parameters():
            p.requires_grad_(True)
        if method == "lcm":
            self.student.diffusion = ConsistencyDiffusion.of(self.teacher.diffusion, lcm_steps)
        self.student.defaults = {"sampler": self.student.diffusion.default_sampler(),
                                 "steps": self.student.diffusion.check_steps(sample_steps), "guidance": 1.0}
        self.ema_network = self.student.ema_network
        self.num_classes, self.conditional = self.student.num_classes, self.student.conditional
        self.image_shape, self.diffusion = self.student.image_shape, self.student.diffusion
        self.pool_size, self.pool_batch, self.seed = pool_size, pool_batch, seed
        self.pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.grid = self.grid_points(grid_steps) if method == "reflow" else None
        self.grid_fraction = grid_fraction

    # ---- couplings ---------------------------------------------------------------------
    def grid_points(self, steps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise levels s, probabilities): where Euler at each of `steps` steps evaluates the student.

        Each step count gets an equal share, split over its points; so s = 1 (the whole of a 1-step
        sample, the first half of a 2-step one) gets the most. The levels come from the student's own
        Euler scheduler (with the teacher's shift), not from a formula that could drift from it.
        """
        levels, weights = [], []
        for n in steps:
            scheduler = self.diffusion.inference_scheduler("euler")
            scheduler.set_timesteps(self.diffusion.check_steps(int(n)))
            levels.extend(scheduler.sigmas[:-1].tolist())
            weights.extend([1 / (len(steps) * n)] * n)
        return torch.tensor(levels), torch.tensor(weights)

    def _labels(self, n: int, generator: torch.Generator | None = None, rng: StepRandom | None = None):
        if not self.conditional:
            return None
        if rng is not None:
            return rng.randint(self.num_classes, n)
        return torch.arange(n) % self.num_classes  # the pool: every class equally often

    @torch.no_grad()
    def solve_teacher(self, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The teacher's image from `noise`: its ODE solved with its sampler, steps and guidance."""
        s = self.solve
        return self.teacher.denoise(noise, labels, s["sampler"], s["steps"], s["guidance"])

    @torch.no_grad()
    def fill_pool(self, device: torch.device) -> None:
        """pool_size couplings from a CPU generator seeded by model.seed: the same pool on resume, on any device."""
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.pool_size, *self.image_shape), generator=generator)
        labels = self._labels(self.pool_size)
        images = [self.solve_teacher(noise[i:i + self.pool_batch].to(device),
                                     None if labels is None else labels[i:i + self.pool_batch].to(device))
                  for i in range(0, self.pool_size, self.pool_batch)]
        self.pool = (noise.to(device), torch.cat(images), None if labels is None else labels.to(device))

    def couplings(self, n: int, rng: StepRandom, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(noise, teacher's image from that noise, labels) for n items of this micro-batch."""
        if not self.pool_size:
            noise = rng.randn(n, *self.image_shape).to(device)
            labels = self._labels(n, rng=rng)
            labels = None if labels is None else labels.to(device)
            return noise, self.solve_teacher(noise, labels), labels
        if self.pool is None or self.pool[0].device != device:
            self.fill_pool(device)
        pick = rng.randint(self.pool_size, n).to(device)
        noise, images, labels = self.pool
        return noise[pick], images[pick], None if labels is None else labels[pick]

    def noise_levels(self, n: int, rng: StepRandom, device: torch.device) -> torch.Tensor:
        """(n,) noise levels s in (0, 1]: grid_fraction of them at Euler's grid points, the rest uniform.

        A 1-step sample is the student's velocity at s = 1 and nothing else, a 2-step one that and one
        at s = 1 / T; a perfectly straight flow would not care where it is trained, but a small student
        is not perfect, and its error counts only where Euler looks. The uniform rest keeps every other
        level (any other step count, Heun) usable.
        """
        levels, weights = self.grid
        pick = torch.searchsorted(weights.cumsum(0), rng.rand(n) * weights.sum()).clamp(max=len(levels) - 1)
        uniform = (1 - rng.rand(n)).clamp(min=1 / self.diffusion.num_train_timesteps)  # (0, 1]: s = 1 included
        on_grid = rng.rand(n) < self.grid_fraction
        return torch.where(on_grid, levels[pick], uniform).to(device)

    @staticmethod
    def straight_path(noise: torch.Tensor, images: torch.Tensor, s: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_s, velocity) on the straight line from the image (s = 0) to its noise (s = 1): the flow
        objective's x_s = (1 - s) x0 + s z and target z - x0, on the teacher's pairs instead of random ones."""
        s_ = s.view(-1, *([1] * (noise.dim() - 1)))
        return (1 - s_) * images + s_ * noise, noise - images

    # ---- the Family protocol -----------------------------------------------------------
    def networks(self) -> dict[str, torch.nn.Module]:
        return {self.ema_network: self.student.denoiser}

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "Distill":
        self.student.to(device)
        self.teacher.denoiser.to(device, dtype)  # frozen: the mixed-precision weight dtype
        return self

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.method == "lcm":
            return self.consistency_loss(batch, rng)
        # The data only sets the batch size: images come from the teacher (labels too, every class equally).
        n, device = len(batch["image"]), batch["image"].device
        noise, images, labels = self.couplings(n, rng, device)
        s = self.noise_levels(n, rng, device)
        x_s, target = self.straight_path(noise, images.to(noise.dtype), s)
        t = s * self.diffusion.num_train_timesteps
        student = self.student
        prediction = student.denoiser(x_s, t, class_labels=student._labels(n, labels, device)).sample
        loss = self.diffusion.loss(prediction, target, torch.ones(n, device=device))
        return loss, {"loss": loss.detach()}

    # ---- consistency distillation (method=lcm) -------------------------------------------
    def consistency(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The student's f(x, t) = c_skip x + c_out x0(x, t), with LCMScheduler's own scalings (f(x, 0) = x)."""
        student = self.student
        out = student.denoiser(x, t, class_labels=student._labels(len(x), labels, x.device)).sample
        return consistency_output(student.diffusion.scheduler, self.diffusion.objective, out, x, t)

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                     labels: torch.Tensor | None) -> torch.Tensor:
        """One DDIM step of the teacher (with its guidance) from x_t to x_{t_prev}: the ODE's next point."""
        net, guidance = self.teacher.denoiser, self.solve["guidance"]
        labels = self.teacher._labels(len(x), labels, x.device)
        if labels is not None and self.teacher.conditional and guidance != 1.0:
            null = torch.full_like(labels, self.num_classes)
            both = net(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null])).sample
            out = guided(*both.chunk(2), guidance)
        else:
            out = net(x, t, class_labels=labels).sample
        teacher = self.teacher.diffusion
        return ddim_step(teacher.scheduler.alphas_cumprod, teacher.objective, out, x, t, t_prev)

    def consistency_loss(self, batch: dict[str, Any], rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """LCM's step: f(x_t, t) towards f(teacher's DDIM step to t - k, t - k), the latter without gradient.

        The target is the student itself under no_grad rather than an EMA copy (LCM's), as improved
        consistency training does: one network to checkpoint, and the boundary f(x, 0) = x anchors it.
        """
        x0 = batch["image"]
        n, device, scheduler = len(x0), x0.device, self.student.diffusion.scheduler
        t, t_prev = lcm_timesteps(scheduler, n, rng, device)
        noise = rng.randn_like(x0)
        labels = batch_labels(batch, self.num_classes)
        x_t = scheduler.add_noise(x0, noise, t)
        x_prev = self.teacher_step(x_t, t, t_prev, labels)
        with torch.no_grad():
            target = self.consistency(x_prev, t_prev, labels)
        loss = self.diffusion.loss(self.consistency(x_t, t, labels), target, torch.ones(n, device=device))
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def sample(self, n: int, seed: int, sampler: str | None = None, steps: int | None = None,
               class_label: int | None = None, guidance: float | None = None, **unknown: Any) -> torch.Tensor:
        """As `DDPM.sample`, at the student's few Euler (reflow) or LCM (lcm) steps (model.sample_steps)."""
        if guidance not in (None, 1.0):
            raise GenlabError(f"--guidance {guidance}: the student has the teacher's guidance "
                              f"({self.solve['guidance']}) built in; sample without --guidance.")
        return self.student.sample(n, seed, sampler=sampler, steps=steps, class_label=class_label, guidance=1.0,
                                   **unknown)

    def export(self, out_dir: Path) -> None:
        """The teacher's export format (DDPMPipeline, or transformer/ + scheduler/), with the student's weights."""
        from genlab.families.pretrained_parts import write_export_info
        from genlab.run_dir import RunDir

        self.student.export(out_dir)
        teacher_model = dict(RunDir(self.teacher_dir).read_config_data().get("model") or {})
        write_export_info(out_dir, teacher=self.teacher_dir, method=self.method, couplings=self.solve,
                          teacher_model={k: teacher_model.get(k) for k in ("backbone", "conditional", "num_classes")})


def distill(teacher: str, lora_rank: int = 0, **keys: Any) -> OnePhase:
    """model=distill on its teacher: configs/model/distill.yaml's `_target_`.

    lora_rank 0: `Distill` (a genlab ddpm run: reflow or lcm, the whole network trained). lora_rank > 0:
    LCM-LoRA (`families.distill_lora.LCMLoRA`) of an SD-style base (a genlab sd run or a diffusers SD
    directory): the base's U-Net frozen, a LoRA of that rank trained, exported for `load_lora_weights`.
    """
    if lora_rank > 0:
        from genlab.families.distill_lora import LCMLoRA

        return LCMLoRA(teacher, lora_rank=lora_rank, **keys)
    return Distill(teacher, **keys)


distill.family = Distill
