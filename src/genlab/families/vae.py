"""VAE family: a diffusers `AutoencoderKL` trained on reconstruction + beta x KL.

The same class trains a small generative VAE (sample from the prior, interpolate, score
anomalies) and the latent autoencoder a Stable Diffusion base uses (`model.vae=RUN_DIR`):
the export is a plain `AutoencoderKL` directory whose `scaling_factor` was measured on
the training data, as Stable Diffusion does.

Losses are per image value (summed over an image, divided by C*H*W), so their size does
not depend on the image size and beta=1 is the exact (Gaussian / Laplace / Bernoulli)
ELBO up to constants.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from torch import nn

from genlab.errors import ConfigError, GenlabError
from genlab.families.contract import Card, Decode, Encode, batch_labels, refuse_unknown_sample_options, unwrap
from genlab.step_random import StepRandom

#: `recon_loss` -> the decoder likelihood it trains (what `genlab eval` scores the VAE with).
LIKELIHOOD_OF_LOSS = {"mse": "gaussian", "l1": "laplace", "bce": "bernoulli"}
RECON_LOSSES = tuple(LIKELIHOOD_OF_LOSS)


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch dim: (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def recon_error(decoded: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Reconstruction error summed per image: (B,). For "bce", `decoded` holds logits."""
    if kind == "bce":  # Bernoulli likelihood of pixel intensities in [0, 1]
        err = F.binary_cross_entropy_with_logits(decoded, (target + 1) / 2, reduction="none")
    elif kind == "l1":
        err = (decoded - target).abs()
    else:
        err = (decoded - target).pow(2)
    return err.flatten(1).sum(1)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b (R, ...) at fractions t (T,): (R, T, ...).

    Gaussian latents live near a sphere; a straight line passes through atypical
    low-norm points in the middle, which decode to blurry images.
    """
    fa, fb = a.flatten(1), b.flatten(1)
    cos = F.cosine_similarity(fa, fb, dim=1).clamp(-1 + 1e-6, 1 - 1e-6)
    omega = torch.acos(cos)[:, None]  # (R, 1)
    t = t[None, :]  # (1, T)
    wa, wb = torch.sin((1 - t) * omega) / torch.sin(omega), torch.sin(t * omega) / torch.sin(omega)
    out = wa[..., None] * fa[:, None] + wb[..., None] * fb[:, None]  # (R, T, D)
    return out.reshape(*out.shape[:2], *a.shape[1:])


class VAENet(nn.Module):
    """An `AutoencoderKL` plus optional label conditioning, in one `forward` (what DDP wraps).

    Conditioning (a conditional VAE): a learned per-class map is an extra input channel of
    the encoder, and a learned per-class latent map is added to z before decoding.
    """

    def __init__(self, autoencoder: AutoencoderKL, image_size: int, latent_shape: tuple[int, int, int],
                 num_classes: int | None = None):
        super().__init__()
        self.autoencoder, self.latent_shape = autoencoder, latent_shape
        self.label_to_image = nn.Embedding(num_classes, image_size * image_size) if num_classes else None
        self.label_to_latent = nn.Embedding(num_classes, math.prod(latent_shape)) if num_classes else None
        if num_classes:
            # Class offsets as far apart as prior samples (N(0, 1) entries): the decoder learns
            # from the start that the label picks a region of latent space. Zero offsets let the
            # encoder put the class into z instead, and prior samples then ignore the label
            # (measured on digits: class KL 0.087 with zeros, 0.0006 with this).
            nn.init.normal_(self.label_to_latent.weight)
        # Running variance of training latents: the export's scaling factor when no explicit
        # measurement was made. A buffer, so it is checkpointed with the weights.
        self.register_buffer("latent_var", torch.ones(()))
        self.register_buffer("latent_var_updates", torch.zeros(()))

    def encode(self, x: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar), each (B, latent_channels, h, w)."""
        if self.label_to_image is not None:
            x = torch.cat([x, self.label_to_image(label).view(-1, 1, *x.shape[2:]).to(x.dtype)], dim=1)
        moments = self.autoencoder.encode(x).latent_dist.parameters
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the clamp diffusers' posterior applies

    def decode(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_to_latent is not None:
            z = z + self.label_to_latent(label).view(-1, *self.latent_shape).to(z.dtype)
        return self.autoencoder.decode(z).sample

    def forward(self, x: torch.Tensor, noise: torch.Tensor, label: torch.Tensor | None = None):
        """Returns (decoded, mean, logvar) with the posterior sample mean + std * noise (noise: (B, *latent_shape))."""
        mean, logvar = self.encode(x, label)
        z = mean + noise.to(mean.dtype) * (0.5 * logvar).exp()
        if self.training:
            with torch.no_grad():  # a running mean (EMA after 100 updates) of the latent variance
                weight = (1.0 / (self.latent_var_updates + 1)).clamp(min=0.01)
                self.latent_var.lerp_(z.detach().float().var(), weight)
                self.latent_var_updates += 1
        return self.decode(z, label), mean, logvar



class VAE:
    """Variational autoencoder on diffusers' `AutoencoderKL`.

    Args:
        image_size, channels: image shape (from the data config).
        num_classes: label count (from the data), needed when `conditional`.
        conditional: train a conditional VAE on batch["label"].
        block_out_channels: channels per level; the latent is 2^(levels-1) times smaller.
        layers_per_block: resnet blocks per level.
        latent_channels: channels of the latent map.
        norm_num_groups: GroupNorm groups (must divide every channel count).
        mid_block_attention: self-attention in the middle block.
        recon_loss: "mse" | "l1" | "bce" (bce: the decoder outputs pixel logits).
        beta: weight of the KL term after warm-up.
        kl_warmup_steps: optimizer steps over which beta rises linearly from 0.
    """

    name = "vae"
    # An AutoencoderKL is a part of a pipeline rather than one: no pipeline tag (the Hub would offer a widget
    # that cannot run it).
    card = Card(what="a variational autoencoder (diffusers AutoencoderKL; its config holds the measured latent "
                     "scaling_factor)", title="VAE", library_name="diffusers", tags=("diffusers", "vae", "autoencoder"),
                use='from diffusers import AutoencoderKL\n\nvae = AutoencoderKL.from_pretrained("{where}")\n'
                    "latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor")
    losses = ("loss", "recon_loss")
    metrics: dict[str, str] = {}

    def __init__(self, image_size: int, channels: int, num_classes: int | None = None, conditional: bool = False,
                 block_out_channels: list[int] = (32, 64, 64), layers_per_block: int = 1, latent_channels: int = 4,
                 norm_num_groups: int = 8, mid_block_attention: bool = True, recon_loss: str = "mse",
                 beta: float = 1.0, kl_warmup_steps: int = 500, temperature: float = 1.0):
        if recon_loss not in RECON_LOSSES:
            raise ConfigError(f"model.recon_loss={recon_loss!r}: use one of {', '.join(RECON_LOSSES)}")
        if conditional and not num_classes:
            raise ConfigError("model.conditional=true needs labelled data (data.num_classes is null); "
                              "use data=digits or set model.conditional=false")
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ConfigError(f"model.norm_num_groups={norm_num_groups} must divide every entry of "
                              f"model.block_out_channels={list(block_out_channels)}")
        factor = 2 ** (len(block_out_channels) - 1)
        if image_size % factor:
            raise ConfigError(f"data.image_size={image_size} is not divisible by the VAE's downsampling factor "
                              f"{factor} (2^(len(model.block_out_channels)-1)); use fewer levels or another size")
        self.image_size, self.channels = image_size, channels
        self.ema_network = "vae"
        self.num_classes = num_classes if conditional else None
        self.recon_loss, self.beta, self.kl_warmup_steps = recon_loss, beta, kl_warmup_steps
        self.temperature = temperature
        self.latent_shape = (latent_channels, image_size // factor, image_size // factor)
        levels = len(block_out_channels)
        autoencoder = AutoencoderKL(
            in_channels=channels + (1 if self.num_classes else 0), out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            latent_channels=latent_channels, norm_num_groups=norm_num_groups, sample_size=image_size,
            mid_block_add_attention=mid_block_attention, scaling_factor=1.0)
        self.vae = VAENet(autoencoder, image_size, self.latent_shape, self.num_classes)

    # ---- the Family protocol ----------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def param_groups(self) -> dict[str, list[dict[str, Any]]]:
        return {"vae": [{"params": [p for p in self.vae.parameters() if p.requires_grad]}]}

    def phases(self, step: int) -> list[str]:
        return ["vae"]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "VAE":
        self.vae.to(device)  # trainable: stays fp32 under mixed precision
        return self

    def beta_at(self, step: int) -> float:
        """KL weight at optimizer step `step`: linear warm-up from 0 to `beta`."""
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, step / self.kl_warmup_steps)

    def loss(self, phase: str, batch: dict[str, Any], step: int,
             rng: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["image"]
        noise = rng.randn(len(x), *self.latent_shape).to(x.device)
        decoded, mean, logvar = self.vae(x, noise, batch_labels(batch, self.num_classes))
        per_value = x[0].numel()  # C*H*W: losses are per image value
        recon = recon_error(decoded.float(), x.float(), self.recon_loss) / per_value  # (B,)
        kl = kl_standard_normal(mean.float(), logvar.float()) / per_value  # (B,)
        beta = self.beta_at(step)
        loss = (recon + beta * kl).mean()
        logs = {"loss": loss.detach(), "recon_loss": recon.detach().mean(), "kl": kl.detach().mean(),
                "beta": torch.tensor(beta, device=x.device)}
        return loss, logs

    @torch.no_grad()
    def sample(self, n: int, seed: int, **options: Any) -> torch.Tensor:
        """Prior samples, or with options a latent walk or reconstructions; (N, C, H, W) in [-1, 1].

        Options:
            class_label: int, the class to generate (conditional VAE); default: rows of classes.
            interpolate: rows of spherical interpolations between random prior points, or
                between consecutive pairs of `images` when given; `steps` columns
                (default: ceil(sqrt(n)), so the default square grid shows one walk per row).
            reconstruct: originals interleaved with their reconstructions; needs `images`
                (and `labels` for a conditional VAE).
            temperature: std of the prior samples (default model.temperature); below 1
                trades variety for cleaner images (reduced-temperature sampling).
            images: (M, C, H, W) in [-1, 1]; labels: (M,) long.
        """
        opts = {k: v for k, v in options.items() if v is not None and v is not False}
        class_label, images, labels = opts.pop("class_label", None), opts.pop("images", None), opts.pop("labels", None)
        interpolate, reconstruct = opts.pop("interpolate", False), opts.pop("reconstruct", False)
        interp_steps = opts.pop("steps", None)  # columns of an interpolation
        temperature = float(opts.pop("temperature", self.temperature))
        refuse_unknown_sample_options(opts, "VAE", "--class, --interpolate, --reconstruct, --temperature",
                                      class_label, self.num_classes)
        net = unwrap(self.vae)
        device = next(net.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        was_training = net.training
        net.eval()
        try:
            if reconstruct:
                if images is None:
                    raise GenlabError("reconstruct=True needs images= (the images to reconstruct)")
                images = images[: max(1, n // 2)].to(device)
                labels = self._sample_labels(len(images), labels, class_label, device)
                recon = self._to_image(net.decode(net.encode(images, labels)[0], labels))
                return torch.stack([images.clamp(-1, 1), recon], dim=1).flatten(0, 1)  # x0, r0, x1, r1, ...
            if interpolate:
                return self._interpolate(net, n, gen, device, images, labels, class_label, interp_steps)
            z = temperature * torch.randn(n, *self.latent_shape, generator=gen).to(device)
            return self._to_image(net.decode(z, self._sample_labels(n, None, class_label, device)))
        finally:
            net.train(was_training)

    def export(self, out_dir: Path) -> None:
        """`AutoencoderKL.save_pretrained(out_dir)` with the measured `scaling_factor` in its config.

        A conditional VAE also writes its label embeddings to `label_embeddings.safetensors`
        (its encoder takes one extra input channel: the label map).
        """
        out_dir = Path(out_dir)
        net = unwrap(self.vae)
        factor = 1.0 / math.sqrt(max(float(net.latent_var), 1e-12))
        net.autoencoder.register_to_config(scaling_factor=float(factor))
        net.autoencoder.save_pretrained(out_dir)
        if self.num_classes:
            save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if k.startswith("label_")},
                      out_dir / "label_embeddings.safetensors")

    # ---- the Autoencoder capability (genlab eval's VAE metrics) --------------------------
    def autoencoder(self) -> tuple[Encode, Decode, str]:
        """The bare network's encode/decode and the likelihood `recon_loss` trains."""
        net = unwrap(self.vae)
        return net.encode, net.decode, LIKELIHOOD_OF_LOSS[self.recon_loss]

    # ---- helpers ----------------------------------------------------------------------

    def _sample_labels(self, n: int, labels: torch.Tensor | None, class_label: int | None,
                       device: torch.device) -> torch.Tensor | None:
        """Labels for n images: given ones, one class, or classes cycling 0..K-1; None if unconditional."""
        if not self.num_classes:
            return None
        if class_label is not None:  # in range: refuse_unknown_sample_options checked it
            return torch.full((n,), class_label, dtype=torch.long, device=device)
        if labels is not None:
            return labels[:n].to(device)
        return torch.arange(n, device=device) % self.num_classes

    def _to_image(self, decoded: torch.Tensor) -> torch.Tensor:
        decoded = decoded.float()
        return decoded.sigmoid() * 2 - 1 if self.recon_loss == "bce" else decoded.clamp(-1, 1)

    def _interpolate(self, net: VAENet, n: int, gen: torch.Generator, device: torch.device,
                     images: torch.Tensor | None, labels: torch.Tensor | None, class_label: int | None,
                     interp_steps: int | None) -> torch.Tensor:
        cols = interp_steps or max(2, math.ceil(math.sqrt(n)))
        rows = math.ceil(n / cols)
        if images is not None:  # walks between consecutive pairs of the given images
            rows = min(rows, len(images) // 2)
            if rows == 0:
                raise GenlabError("interpolate between images needs at least 2 images")
            images = images[: 2 * rows].to(device)
            labels = self._sample_labels(2 * rows, labels, class_label, device)
            mean = net.encode(images, labels)[0]
            a, b = mean[0::2], mean[1::2]
            row_labels = None if labels is None else labels[0::2]
        else:
            a = torch.randn(rows, *self.latent_shape, generator=gen).to(device)
            b = torch.randn(rows, *self.latent_shape, generator=gen).to(device)
            row_labels = self._sample_labels(rows, None, class_label, device)
        z = slerp(a, b, torch.linspace(0, 1, cols, device=device)).flatten(0, 1)  # (rows*cols, ...)
        z_labels = None if row_labels is None else row_labels.repeat_interleave(cols)
        return self._to_image(net.decode(z, z_labels))[:n]
