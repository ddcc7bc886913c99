"""The GAN family: `n_critic` discriminator phases ("d") then one generator phase ("g") per optimizer step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from genlab.errors import ConfigError, GenlabError
from genlab.families.contract import Card, batch_labels, refuse_unknown_sample_options, unwrap
from genlab.step_random import StepRandom
from genlab.families.gan.augmentation import AUGMENTS, PADDINGS, diff_augment
from genlab.families.gan.diagnostics import GanDiagnostics
from genlab.families.gan.losses import (G_LOSSES, LOSSES, d_loss_hinge, d_loss_lsgan, d_loss_nonsaturating, d_loss_rpgan,
                                        d_loss_wgan, g_loss_rpgan, gradient_penalty, r1_penalty, r2_penalty)
from genlab.families.gan.networks import ARCHS, Discriminator, Generator


def mode_seeking_ratio(fake_a: torch.Tensor, fake_b: torch.Tensor, z_a: torch.Tensor,
                       z_b: torch.Tensor) -> torch.Tensor:
    """Image distance over latent distance for pairs of fakes (MSGAN, Mao et al. 2019).

    A generator that ignores z (one image per class) scores 0; the G loss adds
    weight / ratio, so such a generator pays more the closer it gets.
    """
    return (fake_a - fake_b).float().abs().mean() / (z_a - z_b).float().abs().mean()


def same_class_distance(real: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-pixel L1 distance between real images of the same class (any two when unlabelled).

    The spread that pairs of fakes sharing a label should reach; inf when the batch has no
    such pair (then nothing caps the mode-seeking term).
    """
    flat = real.detach().flatten(1).float()
    dist = torch.cdist(flat, flat, p=1) / flat.shape[1]  # (B, B)
    same = ~torch.eye(len(flat), dtype=torch.bool, device=flat.device)
    if labels is not None:
        same &= labels[:, None] == labels[None, :]
    return dist[same].mean() if same.any() else torch.tensor(float("inf"), device=flat.device)


def latent_noise(n: int, latent_dim: int, seed: int, truncation: float = 0.0) -> torch.Tensor:
    """Seeded z (n, latent_dim): standard normal, or with `truncation` > 0 the truncation trick
    (BigGAN): a normal truncated at +-truncation, trading variety for cleaner samples."""
    generator = torch.Generator().manual_seed(seed)
    if truncation < 0:
        raise GenlabError(f"truncation={truncation}: use 0 (off) or a threshold such as 1.0 or 0.5")
    if not truncation:
        return torch.randn(n, latent_dim, generator=generator)
    return torch.nn.init.trunc_normal_(torch.empty(n, latent_dim), 0.0, 1.0, -truncation, truncation,
                                       generator=generator)


class GAN:
    """Unconditional or class-conditional GAN (projection discriminator).

    Args:
        image_size, channels: image shape (from the data config); image_size = 4 x 2^k.
        num_classes: label count (from the data), needed when `conditional`.
        conditional: class-conditional G (embedding concatenated to z) and projection D.
        cond_transition: [start, end] optimizer steps over which the label's weight in G and D
            rises linearly from 0 to 1 (transitional training, Shahbazi et al. 2022): before
            `start` both train unconditionally. Conditioned from step 0 on little data, a cGAN
            tends to draw one image per class. [0, 0] = conditioned from the start.
        arch: "dcgan", "resnet" (SNGAN-style residual blocks) or "r3gan" (R3GAN's modernised ResNet:
            1-3-1 grouped-conv blocks, bilinear resampling, no normalisation; use spectral_norm=false).
        latent_dim: size of z.
        g_channels, d_channels: network widths at full resolution (doubling per level, capped at 8x).
        loss: "nonsaturating" | "hinge" | "wgan_gp" | "lsgan" | "rpgan" (relativistic pairing, R3GAN's).
        spectral_norm: spectral normalisation on every discriminator layer.
        r1_gamma: R1 penalty weight on reals (loss += gamma/2 * R1); 0 = off.
        r2_gamma: R2 penalty weight on fakes (loss += gamma/2 * R2); 0 = off. R3GAN: both, equal.
        gp_weight: WGAN-GP penalty weight (loss=wgan_gp).
        n_critic: discriminator updates per generator update.
        d_lr_scale, g_lr_scale: multiply trainer.lr per network (TTUR).
        betas: Adam betas for both networks, overriding the optimizer's (GANs want a low beta1); None keeps them.
        instance_noise: initial std of Gaussian noise added to D's inputs, annealed linearly to 0
            over `instance_noise_steps`.
        label_smoothing: one-sided: the real target is 1 - this (nonsaturating and lsgan).
        diffaug: DiffAugment policies, a list ([color, translation, cutout]) or a comma-separated
            string ("color,translation"); empty = off.
        diffaug_padding: what translation fills the uncovered strip with: "reflection" (the image's
            own border mirrored), "border" (its edge pixels repeated) or "zeros" (DiffAugment's
            original; mid-grey in [-1, 1], unlike any digit's background).
        g_upsample: DCGAN generator upsampling: "transposed" (strided transposed conv), "nearest"
            or "bilinear" (resize, then a 3x3 conv).
        truncation: sampling only: z from a normal truncated at +-truncation (BigGAN's truncation
            trick); 0 = off. `genlab sample --truncation` overrides it.
        mode_seeking: weight of MSGAN's mode-seeking term in the G loss (weight / image-over-latent
            distance of fake pairs with the same label); 0 = off. Keeps a cGAN from drawing
            one image per class.
        mode_seeking_cap: the term stops rewarding distance once same-label fakes are as far
            apart as same-class reals in the batch (false: MSGAN's unbounded term, which bought
            distance with artifacts).
        diag_every: optimizer steps between diagnostics (0 = off); diag_window: values they look at.
    """

    name = "gan"
    # safetensors + JSON is no Hub library's format: no library name.
    card = Card(what="a GAN generator (generator.safetensors + generator_config.json)", title="GAN",
                pipeline_tag="unconditional-image-generation", tags=("gan", "pytorch", "safetensors"),
                use='from genlab.families.gan import load_generator\n\ngenerator = load_generator("{where}")')
    losses = ("g_loss", "d_loss")
    metrics: dict[str, str] = {}

    def __init__(self, image_size: int, channels: int, num_classes: int | None = None, conditional: bool = False,
                 arch: str = "dcgan", latent_dim: int = 64, g_channels: int = 64, d_channels: int = 64,
                 loss: str = "hinge", spectral_norm: bool = True, r1_gamma: float = 0.0, r2_gamma: float = 0.0,
                 gp_weight: float = 10.0,
                 n_critic: int = 1, d_lr_scale: float = 1.0, g_lr_scale: float = 1.0,
                 betas: list[float] | None = (0.5, 0.999), instance_noise: float = 0.0,
                 instance_noise_steps: int = 1000, label_smoothing: float = 0.0, diffaug: str | list[str] = "",
                 diag_every: int = 200, diag_window: int = 100, truncation: float = 0.0,
                 cond_transition: list[int] = (0, 0), mode_seeking: float = 0.0, diffaug_padding: str = "reflection",
                 g_upsample: str = "transposed", mode_seeking_cap: bool = True):
        if arch not in ARCHS:
            raise ConfigError(f"model.arch={arch!r}: use one of {', '.join(ARCHS)}")
        if loss not in LOSSES:
            raise ConfigError(f"model.loss={loss!r}: use one of {', '.join(LOSSES)}")
        if conditional and not num_classes:
            raise ConfigError("model.conditional=true needs labelled data (data.num_classes is null); "
                              "use data=digits or set model.conditional=false")
        if arch == "r3gan" and spectral_norm:
            # Its residual blocks start with zero-initialised convolutions: spectral norm divides by their norm, 0.
            raise ConfigError("model.arch=r3gan with model.spectral_norm=true gives NaN at the first step (zero-initialised "
                              "layers); R3GAN regularises with R1 and R2 instead: set model.spectral_norm=false.")
        policies = diffaug.split(",") if isinstance(diffaug, str) else list(diffaug or [])
        self.diffaug = [p.strip() for p in policies if p.strip()]
        unknown = [p for p in self.diffaug if p not in AUGMENTS]
        if unknown:
            raise ConfigError(f"model.diffaug: unknown {', '.join(unknown)}; use a list of {', '.join(AUGMENTS)}, "
                              "e.g. model.diffaug=[color,translation]")
        self.ema_network = "generator"
        if diffaug_padding not in PADDINGS:
            raise ConfigError(f"model.diffaug_padding={diffaug_padding!r}: use one of {', '.join(PADDINGS)}")
        if g_upsample not in ("transposed", "nearest", "bilinear"):
            raise ConfigError(f"model.g_upsample={g_upsample!r}: use transposed, nearest or bilinear")
        self.diffaug_padding = diffaug_padding
        self.num_classes = num_classes if conditional else None
        self.loss_name, self.r1_gamma, self.r2_gamma = loss, r1_gamma, r2_gamma
        self.gp_weight, self.n_critic = gp_weight, n_critic
        self.lr_scales, self.betas = {"d": d_lr_scale, "g": g_lr_scale}, betas
        self.instance_noise, self.instance_noise_steps = instance_noise, instance_noise_steps
        self.real_target, self.diag_every = 1.0 - label_smoothing, diag_every
        self.truncation = truncation
        start, end = cond_transition
        if not 0 <= start <= end:
            raise ConfigError(f"model.cond_transition={list(cond_transition)}: use [start, end] optimizer steps "
                              "with 0 <= start <= end, e.g. [500, 1500]; [0, 0] conditions from the start")
        self.cond_transition = (start, end)
        self.mode_seeking, self.mode_seeking_cap = mode_seeking, mode_seeking_cap
        self.generator_config = {"arch": arch, "latent_dim": latent_dim, "image_size": image_size,
                                 "channels": channels, "width": g_channels, "num_classes": self.num_classes,
                                 "upsample": g_upsample}
        self.generator = Generator(**self.generator_config)
        self.discriminator = Discriminator(arch, image_size, channels, d_channels, self.num_classes, spectral_norm)
        self.diagnostics = GanDiagnostics(window=diag_window)

    @property
    def eval_variants(self) -> dict[str, dict[str, float]]:
        """What `genlab eval` measures besides the default samples: truncation 1.0 and 0.5 (variety
        traded for confidence), and no truncation when model.truncation is set."""
        return {f"truncation_{t:g}": {"truncation": t} for t in (0.0, 1.0, 0.5) if t != self.truncation}

    # ---- the Family protocol ----------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def param_groups(self) -> dict[str, list[dict[str, Any]]]:
        groups = {}
        for phase, network in (("d", self.discriminator), ("g", self.generator)):
            group = {"params": [p for p in network.parameters() if p.requires_grad], "lr_scale": self.lr_scales[phase]}
            if self.betas is not None:
                group["betas"] = tuple(self.betas)
            groups[phase] = [group]
        return groups

    def phases(self, step: int) -> list[str]:
        return ["d"] * self.n_critic + ["g"]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "GAN":
        self.generator.to(device)  # both trainable: fp32 under mixed precision
        self.discriminator.to(device)
        return self

    def cond_scale_at(self, step: int) -> float:
        """The label's weight in G and D at optimizer step `step` (cond_transition)."""
        start, end = self.cond_transition
        if step >= end:
            return 1.0
        if step <= start:  # also a hard switch at start == end
            return 0.0
        return (step - start) / (end - start)

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real, labels = batch["image"], batch_labels(batch, self.num_classes)
        if self.num_classes and self.cond_transition[1]:
            scale = self.cond_scale_at(step)
            for network in (self.generator, self.discriminator):
                unwrap(network).cond_scale.fill_(scale)
        z = rng.randn(len(real), self.generator_config["latent_dim"]).to(real.device)
        # The loop clears every network's gradients before each phase: G's phase leaves none in D.
        if phase == "d":
            with torch.no_grad():
                fake = self.generator(z, labels)
            loss, logs = self._d_loss(real, fake, labels, step, rng)
        else:
            half, fake_labels = len(z) // 2, labels
            if self.mode_seeking and half and labels is not None:
                fake_labels = labels[:half].repeat(2)  # pairs (i, i + half) share a label, differ in z
                z = z[:2 * half]
            fake = self.generator(z, fake_labels)
            fake_logits = self._discriminate(fake, fake_labels, step, rng).float()
            if self.loss_name == "rpgan":  # pairs each fake with a real; only the fake side trains G
                with torch.no_grad():
                    pairs = slice(0, len(fake))
                    real_logits = self._discriminate(real[pairs], None if labels is None else labels[pairs], step, rng)
                loss = g_loss_rpgan(real_logits.float(), fake_logits)
            else:
                loss = G_LOSSES[self.loss_name](fake_logits)
            logs = {"g_loss": loss.detach()}
            if self.mode_seeking and half:
                z_a, z_b = z[:half], z[half:2 * half]
                ratio = mode_seeking_ratio(fake[:half], fake[half:2 * half], z_a, z_b)
                # MSGAN's weight / ratio rewards ever more pixel difference between same-label fakes;
                # past the data's own spread G bought it with bright blocks and broken strokes
                # (docs/evaluation.md, GAN artifacts). Capped, the reward stops at the real spread.
                at_data_spread = 0.0  # 1 / ratio for fakes as far apart as same-class reals
                if self.mode_seeking_cap:
                    at_data_spread = (z_a - z_b).float().abs().mean() / same_class_distance(real, labels)
                loss = loss + self.mode_seeking * F.relu(1 / (ratio + 1e-5) - at_data_spread)
                logs["ms_ratio"] = ratio.detach()
        self.diagnostics.record(logs)
        return loss, logs

    @torch.no_grad()
    def sample(self, n: int, seed: int, **options: Any) -> torch.Tensor:
        """n images (n, C, H, W) in [-1, 1] from seeded z; `class_label=k` for a conditional GAN
        (default: classes cycling 0..K-1); `truncation` overrides model.truncation."""
        opts = {k: v for k, v in options.items() if v is not None and v is not False}
        class_label = opts.pop("class_label", None)
        truncation = float(opts.pop("truncation", self.truncation))
        refuse_unknown_sample_options(opts, "GAN", "--class and --truncation", class_label, self.num_classes)
        generator = unwrap(self.generator)
        device = next(generator.parameters()).device
        z = latent_noise(n, self.generator_config["latent_dim"], seed, truncation)
        labels = None
        if self.num_classes:
            labels = torch.arange(n) % self.num_classes if class_label is None else torch.full((n,), class_label)
            labels = labels.to(device)
        was_training = generator.training
        generator.eval()  # BatchNorm running statistics: samples do not depend on the batch
        try:
            return generator(z.to(device), labels).float().clamp(-1, 1)
        finally:
            generator.train(was_training)

    def export(self, out_dir: Path) -> None:
        """`generator.safetensors` + `generator_config.json` (its constructor arguments); see `load_generator`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in unwrap(self.generator).state_dict().items()}
        save_file(state, out_dir / "generator.safetensors")
        (out_dir / "generator_config.json").write_text(json.dumps(self.generator_config, indent=2))

    # ---- internals --------------------------------------------------------------------
    # ---- the Diagnosed capability: the loop calls this every `diag_every` steps -----------
    @torch.no_grad()
    def diagnose(self, batch: dict[str, Any]) -> list[str]:
        """D/G balance from the recorded logs, and the spread of a fixed-noise fake batch against
        the batch's real images (within each class when conditional). Returns the warnings (also logged)."""
        real, labels = batch["image"], batch_labels(batch, self.num_classes)
        messages = [self.diagnostics.check_balance()]
        if len(real) >= 2:  # sample() uses the bare generator in eval mode and restores train mode
            fake = self.sample(64, seed=0)  # conditional: classes cycle 0..K-1
            fake_labels = torch.arange(len(fake), device=fake.device) % self.num_classes if self.num_classes else None
            messages.append(self.diagnostics.check_diversity(fake, real, fake_labels, labels))
        return [m for m in messages if m]

    def _d_loss(self, real, fake, labels, step, rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real = real.detach().requires_grad_(self.r1_gamma > 0)
        fake = fake.detach().requires_grad_(self.r2_gamma > 0)
        real_logits = self._discriminate(real, labels, step, rng).float()
        fake_logits = self._discriminate(fake, labels, step, rng).float()
        logs = {}
        if self.loss_name == "rpgan":
            loss = d_loss_rpgan(real_logits, fake_logits)
        elif self.loss_name == "nonsaturating":
            loss = d_loss_nonsaturating(real_logits, fake_logits, self.real_target)
        elif self.loss_name == "hinge":
            loss = d_loss_hinge(real_logits, fake_logits)
        elif self.loss_name == "lsgan":
            loss = d_loss_lsgan(real_logits, fake_logits, self.real_target)
        else:
            gp = gradient_penalty(lambda x: self.discriminator(x, labels).float(), real, fake, rng.rand(len(real)))
            loss = d_loss_wgan(real_logits, fake_logits) + self.gp_weight * gp
            logs["gp"] = gp.detach()
        if self.r1_gamma > 0:
            r1 = r1_penalty(real_logits, real)
            loss = loss + self.r1_gamma / 2 * r1
            logs["r1"] = r1.detach()
        if self.r2_gamma > 0:
            r2 = r2_penalty(fake_logits, fake)
            loss = loss + self.r2_gamma / 2 * r2
            logs["r2"] = r2.detach()
        real_logits, fake_logits = real_logits.detach(), fake_logits.detach()
        # Where D's decision boundary lies: 0 for logits, 0.5 for LSGAN's 0/1 targets, the
        # midpoint of the batch for an (unbounded) WGAN critic or a relativistic D.
        midpoint = (real_logits.mean() + fake_logits.mean()) / 2  # relativistic scores drift as a whole
        threshold = {"lsgan": 0.5, "wgan_gp": midpoint, "rpgan": midpoint}.get(self.loss_name, 0.0)
        to_score = torch.sigmoid if self.loss_name == "nonsaturating" else (lambda t: t)
        accuracy = ((real_logits > threshold).float().mean() + (fake_logits < threshold).float().mean()) / 2
        logs |= {"d_loss": loss.detach(), "d_real": to_score(real_logits).mean(),
                 "d_fake": to_score(fake_logits).mean(), "d_acc": accuracy}
        if self.instance_noise:
            logs["instance_noise"] = torch.tensor(self._noise_std(step), device=real.device)
        return loss, logs

    def _discriminate(self, x: torch.Tensor, labels: torch.Tensor | None, step: int, rng: StepRandom) -> torch.Tensor:
        """D on augmented, noised inputs (the same for reals and fakes, in both phases)."""
        if self.diffaug:
            x = diff_augment(x, self.diffaug, rng, self.diffaug_padding)
        std = self._noise_std(step)
        if std > 0:
            x = x + std * rng.randn_like(x)
        return self.discriminator(x, labels)

    def _noise_std(self, step: int) -> float:
        if not self.instance_noise:
            return 0.0
        return self.instance_noise * max(0.0, 1.0 - step / max(1, self.instance_noise_steps))
