"""DDPM: pixel-space diffusion with a U-Net (Ho et al. 2020) or a diffusion transformer (DiT, Peebles & Xie 2023).

The objective, noise schedule, timestep sampling, loss weighting and samplers are the shared
diffusion core's (`genlab.diffusion`): epsilon / v / x0 on a DDPM schedule, or rectified
flow. This file owns the denoiser (diffusers' UNet2DModel or DiTTransformer2DModel), class
dropout for classifier-free guidance, and the export.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from genlab.diffusion import Diffusion, guided
from genlab.errors import GenlabError
from genlab.families.contract import Card, batch_labels, diffusers_blocks
from genlab.families.repa import build_repa
from genlab.step_random import StepRandom

# sdpa: torch's fused scaled_dot_product_attention (diffusers' default); eager: matmul, softmax, matmul.
ATTENTION = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}
#: model.backbone -> the attribute (and checkpoint file) name of the denoiser.
BACKBONES = {"unet": "unet", "dit": "transformer"}


def tiny_dit(dit: dict[str, Any], image_size: int, channels: int, num_classes: int) -> DiTTransformer2DModel:
    """A class-conditional DiTTransformer2DModel on pixels (patches of `dit.patch_size`)."""
    if image_size % dit.get("patch_size", 2):
        raise GenlabError(f"data.image_size={image_size} is not a multiple of model.dit.patch_size "
                          f"({dit.get('patch_size', 2)}).")
    net = DiTTransformer2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                                num_embeds_ada_norm=num_classes, **dit)
    # DiT drops labels itself with torch's global RNG; genlab drops them from the step's StepRandom
    # (same draws on any number of processes, and on resume). Its table keeps the "no class" row.
    for block in net.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return net


def refuse_headless_attention(unet: UNet2DModel) -> None:
    """UNet2DModel gives an attention layer channels // attention_head_dim heads; with 0 heads it
    builds, then fails at the first step with a ZeroDivisionError. Say so before training."""
    narrow = sorted({m.query_dim for m in unet.modules() if isinstance(m, Attention) and m.heads == 0})
    if narrow:
        raise GenlabError(f"model.unet.attention_head_dim={unet.config.attention_head_dim} is wider than an attention layer of {narrow[0]} "
                          f"channels (the middle block and every Attn* block attend): set it to at most {narrow[0]} "
                          f"or widen model.unet.block_out_channels.")


class DDPM:
    """Pixel-space diffusion, unconditional or class-conditional.

    Args:
        image_size, channels: image shape (from the data config).
        num_classes: label count of the data (None when unlabelled).
        conditional: train with class labels; index `num_classes` means "no class" and is
            used for `cond_dropout` of the labels, so one network gives both the
            conditional and unconditional predictions that guidance mixes.
        backbone: unet | dit.
        unet: UNet2DModel arguments (backbone=unet).
        dit: DiTTransformer2DModel arguments (backbone=dit).
        attention: sdpa | eager, the denoiser's attention implementation (see ATTENTION).
        sampler, sample_steps, guidance: defaults for `sample` (sampler None: the objective's default).
        repa: `model.repa` (encoder, weight, layer, projector_dim): REPA's alignment term (families.repa);
            off when it names no encoder or its weight is 0.
        **diffusion: the diffusion core's keys (`Diffusion.build`): objective, schedule,
            num_train_timesteps, zero_terminal_snr, shift, timesteps, weighting, snr_gamma, offset_noise.
    """

    name = "ddpm"
    card = Card(what="a DDPM (diffusers UNet2DModel + DDPMScheduler)", title="DDPM",
                library_name="diffusers", pipeline_tag="unconditional-image-generation",
                tags=("diffusers", "ddpm", "diffusers:DDPMPipeline"),
                use='from diffusers import DDPMPipeline\n\npipe = DDPMPipeline.from_pretrained("{where}")\n'
                    "images = pipe(batch_size=16).images")
    # diffusers' DiTPipeline decodes with a VAE and assumes ImageNet's 1,000 classes: no pipeline fits a pixel DiT.
    dit_card = Card(what="a pixel-space diffusion transformer (diffusers DiTTransformer2DModel in transformer/, "
                         "its scheduler in scheduler/)", title="ddpm_dit",
                    library_name="diffusers", pipeline_tag="unconditional-image-generation",
                    tags=("diffusers", "dit", "diffusion-transformer"),
                    use="import torch\nfrom diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler\n\n"
                        'transformer = DiTTransformer2DModel.from_pretrained("{where}", subfolder="transformer")\n'
                        'scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("{where}", subfolder="scheduler")'
                        "  # flow runs; DDIMScheduler etc. otherwise\n"
                        "scheduler.set_timesteps(8)\nlabels = torch.arange(10)  # the class of each image\n"
                        "x = torch.randn(10, transformer.config.in_channels, transformer.config.sample_size, "
                        "transformer.config.sample_size)\n"
                        "with torch.no_grad():\n    for t in scheduler.timesteps:\n"
                        "        out = transformer(x, t.expand(len(x)), class_labels=labels).sample\n"
                        "        x = scheduler.step(out, t, x).prev_sample\nimages = (x.clamp(-1, 1) + 1) / 2")
    losses = ("loss", "diffusion_loss", "repa_loss")
    metrics: dict[str, str] = {}

    @classmethod
    def card_for(cls, model: Mapping[str, Any], export: Mapping[str, Any] | None = None) -> Card:
        """The DiT backbone exports transformer/ + scheduler/, not a DDPMPipeline; a conditional U-Net says so."""
        conditional = (f"Class-conditional ({model.get('num_classes')} classes): the network takes `class_labels`, "
                       "which diffusers' stock pipeline does not pass; `genlab sample RUN --class K` draws class K.")
        card = cls.dit_card if model.get("backbone") == "dit" else cls.card
        return replace(card, notes=(conditional,)) if card is cls.card and model.get("conditional") else card

    def __init__(self, image_size: int, channels: int, unet: dict[str, Any] | None = None,
                 num_classes: int | None = None, conditional: bool = False, cond_dropout: float = 0.1,
                 backbone: str = "unet", dit: dict[str, Any] | None = None, attention: str = "sdpa",
                 sampler: str | None = None, sample_steps: int | None = 50, guidance: float = 1.0,
                 repa: dict[str, Any] | None = None, **diffusion: Any):
        if conditional and not num_classes:
            raise GenlabError("model.conditional=true needs labelled data (data.num_classes is null); "
                              "use data=digits or set model.conditional=false.")
        if backbone not in BACKBONES:
            raise GenlabError(f"model.backbone={backbone!r}: use one of {', '.join(BACKBONES)}.")
        if attention not in ATTENTION:
            raise GenlabError(f"model.attention={attention!r}: use one of {', '.join(ATTENTION)}")
        self.image_shape = (channels, image_size, image_size)
        self.num_classes = num_classes if conditional else None
        self.conditional, self.cond_dropout = conditional, cond_dropout
        self.backbone, self.ema_network = backbone, BACKBONES[backbone]
        if backbone == "unet":
            self.unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                                    num_class_embeds=num_classes + 1 if conditional else None, **(unet or {}))
            refuse_headless_attention(self.unet)
        else:  # DiT always takes a label: an unconditional one sees class 0 of 1
            self.transformer = tiny_dit(dit or {}, image_size, channels, num_classes if conditional else 1)
        for module in self.denoiser.modules():
            if isinstance(module, Attention):
                module.set_processor(ATTENTION[attention]())
        self.repa = build_repa(self.denoiser, repa, image_size, channels)
        if self.repa:  # trained and checkpointed beside the denoiser; not exported
            self.repa_projector = self.repa.projector
        # Pixels live in [-1, 1]: DDPM-family samplers clip their x0 estimate there.
        self.diffusion = Diffusion.build(clip_sample=True, **diffusion)
        sampler = sampler or self.diffusion.default_sampler()
        self.diffusion.check_sampler(sampler)  # fail now, not at the first sample grid
        self.defaults = {"sampler": sampler, "steps": sample_steps, "guidance": guidance}

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network (the loop may have replaced the attribute by its wrapped module)."""
        return getattr(self, self.ema_network)

    # ---- the Family protocol -----------------------------------------------------------
    def networks(self) -> dict[str, torch.nn.Module]:
        return {self.ema_network: self.denoiser, **({"repa_projector": self.repa_projector} if self.repa else {})}

    def param_groups(self) -> dict[str, list[dict]]:
        """One optimizer: the denoiser's parameters (and REPA's projector, which trains with it)."""
        params = [p for network in self.networks().values() for p in network.parameters() if p.requires_grad]
        return {self.ema_network: [{"params": params}]}

    def shard_units(self) -> dict[str, list[torch.nn.Module]]:
        """strategy=fsdp: the U-Net's down, middle and up blocks, or the DiT's transformer blocks."""
        return {self.ema_network: diffusers_blocks(self.denoiser)}

    def phases(self, step: int) -> list[str]:
        return [self.ema_network]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "DDPM":
        for network in self.networks().values():
            network.to(device)
        return self

    def _labels(self, n: int, labels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """What the denoiser takes as class_labels: the labels, or class 0 for an unconditional DiT."""
        if labels is None and self.backbone == "dit":
            return torch.zeros(n, dtype=torch.long, device=device)
        return labels

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0 = batch["image"]  # (B, C, H, W) in [-1, 1]
        x_t, t, target, weight = self.diffusion.training_inputs(x0, rng)
        labels = None
        if self.conditional:
            drop = rng.rand(len(x0)).to(x0.device) < self.cond_dropout
            labels = batch_labels(batch, self.num_classes)
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        prediction = self.denoiser(x_t, t, class_labels=self._labels(len(x0), labels, x0.device)).sample
        loss = self.diffusion.loss(prediction, target, weight)
        if not self.repa:
            return loss, {"loss": loss.detach()}
        repa_loss = self.repa.loss(self.repa_projector, x0)
        total = loss + self.repa.weight * repa_loss
        return total, {"loss": total.detach(), "diffusion_loss": loss.detach(), "repa_loss": repa_loss.detach()}

    @torch.no_grad()
    def sample(self, n: int, seed: int, sampler: str | None = None, steps: int | None = None,
               class_label: int | None = None, guidance: float | None = None, **unknown: Any) -> torch.Tensor:
        """Generate `n` images (n, C, H, W) in [-1, 1], deterministic in `seed`.

        Args:
            sampler: one of the objective's samplers (`Diffusion.samplers`); default model.sampler.
            steps: denoising steps; default model.sample_steps (all training steps if null).
            class_label: for conditional models; None cycles through the classes.
            guidance: classifier-free guidance scale (1 = plain conditional).
        """
        if unknown:
            raise GenlabError(f"option(s) {', '.join(unknown)} do not apply to DDPM models")
        if class_label is not None and not self.conditional:
            raise GenlabError("--class needs a conditional model (train with model.conditional=true)")
        sampler = sampler or self.defaults["sampler"]
        steps = steps or self.defaults["steps"] or self.diffusion.num_train_timesteps
        guidance = self.defaults["guidance"] if guidance is None else guidance
        device = next(self.denoiser.parameters()).device
        generator = torch.Generator().manual_seed(seed)  # CPU generator: same noise on any device
        noise = torch.randn((n, *self.image_shape), generator=generator).to(device)
        labels = None
        if self.conditional:
            labels = torch.arange(n) % self.num_classes if class_label is None else torch.full((n,), class_label)
            labels = labels.to(device)
        return self.denoise(noise, labels, sampler, steps, guidance, generator)

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, labels: torch.Tensor | None, sampler: str, steps: int, guidance: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] from `noise` (and class `labels`, conditional models): what `sample` draws
        after its noise, and what a distilled student (families.distill) takes as the teacher's answer."""
        net = self.denoiser
        labels = self._labels(len(noise), labels, noise.device)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if self.conditional and guidance != 1.0:
                null = torch.full_like(labels, self.num_classes)
                both = net(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null])).sample
                return guided(*both.chunk(2), guidance)
            return net(x, t, class_labels=labels).sample

        return self.diffusion.denoise(predict, noise, sampler, steps, generator).clamp(-1, 1)

    def export(self, out_dir: Path) -> None:
        """U-Net: a diffusers DDPMPipeline directory; DiT: `transformer/` and `scheduler/` (see docs/guide/diffusion.md)."""
        if self.backbone == "unet":
            from diffusers import DDPMPipeline  # here: diffusers' pipelines cost every start ~0.4 s

            DDPMPipeline(unet=self.unet, scheduler=self.diffusion.scheduler).save_pretrained(out_dir)
            return
        # diffusers' DiTPipeline decodes with a VAE and takes 1000 classes: no pipeline fits pixel DiT.
        self.transformer.save_pretrained(Path(out_dir) / "transformer")
        self.diffusion.scheduler.save_pretrained(Path(out_dir) / "scheduler")
