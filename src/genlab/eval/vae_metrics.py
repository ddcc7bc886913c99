"""VAE metrics on held-out data: reconstruction error, ELBO, IWAE bound, anomaly AUROC.

The VAE is given as two callables, so any implementation fits:

    encode(x) -> (mean, logvar)   the diagonal Gaussian q(z|x); x (N, C, H, W) in [-1, 1]
    decode(z) -> x_mean           the decoder's mean, same shape as x

`autoencoder_kl_fns` makes them from a diffusers `AutoencoderKL` (the genlab VAE export).
The prior is N(0, I) on those latents, as in AutoencoderKL's own KL term. The decoder's
likelihood p(x|z) is a choice the metrics cannot read off the model: "gaussian" with a
fixed `decoder_std` (in [-1, 1] pixel units) or "bernoulli" on pixels mapped to [0, 1].
Values are in nats per image; compare runs only under the same choice.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from sklearn.metrics import roc_auc_score

Encode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Decode = Callable[[torch.Tensor], torch.Tensor]


def autoencoder_kl_fns(vae) -> tuple[Encode, Decode]:
    """(encode, decode) of a diffusers `AutoencoderKL` (unscaled latents, no scaling_factor)."""

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = vae.encode(x).latent_dist
        return posterior.mean, posterior.logvar

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z).sample

    return encode, decode


def log_likelihood(x: torch.Tensor, x_mean: torch.Tensor, likelihood: str = "gaussian",
                   decoder_std: float = 0.1) -> torch.Tensor:
    """log p(x | z) per image, (N,), for a decoder output `x_mean`."""
    if likelihood == "gaussian":
        log_p = torch.distributions.Normal(x_mean, decoder_std).log_prob(x)
    elif likelihood == "bernoulli":
        target, p = (x + 1) / 2, ((x_mean + 1) / 2).clamp(1e-6, 1 - 1e-6)
        log_p = target * p.log() + (1 - target) * (1 - p).log()
    else:
        raise ValueError(f"likelihood={likelihood!r}: use 'gaussian' or 'bernoulli'")
    return log_p.flatten(1).sum(1)


def _log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log density per image, (N,)."""
    log_p = -0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 / logvar.exp())
    return log_p.flatten(1).sum(1)


@torch.no_grad()
def vae_scores(encode: Encode, decode: Decode, images: torch.Tensor, k: int = 16, likelihood: str = "gaussian",
               decoder_std: float = 0.1, batch_size: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-image reconstruction error, ELBO and importance-weighted NLL bound.

    With k posterior samples z_i and weights w_i = p(x|z_i) p(z_i) / q(z_i|x):
    ELBO = mean_i log w_i and IWAE = log mean_i w_i (Burda et al. 2016), so
    ELBO <= IWAE <= log p(x) and -IWAE is an upper bound on the NLL that tightens with k.

    Args:
        images: (N, C, H, W) in [-1, 1] on the VAE's device.
        k: importance samples per image.

    Returns:
        {"recon_mse": per-pixel MSE of decode(mean), "elbo": nats, "nll_iwae": nats},
        each (N,) on the CPU.
    """
    generator = torch.Generator(images.device).manual_seed(seed)
    out = {"recon_mse": [], "elbo": [], "nll_iwae": []}
    for x in images.split(batch_size):
        mean, logvar = encode(x)
        out["recon_mse"].append((decode(mean) - x).pow(2).flatten(1).mean(1))
        log_w = []
        for _ in range(k):
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + (0.5 * logvar).exp() * eps
            log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
            log_w.append(log_likelihood(x, decode(z), likelihood, decoder_std) + log_pz - _log_normal(z, mean, logvar))
        log_w = torch.stack(log_w)  # (k, B)
        out["elbo"].append(log_w.mean(0))
        out["nll_iwae"].append(math.log(k) - log_w.logsumexp(0))
    return {name: torch.cat(v).float().cpu() for name, v in out.items()}


def vae_metrics(encode: Encode, decode: Decode, images: torch.Tensor, k: int = 16, likelihood: str = "gaussian",
                decoder_std: float = 0.1) -> dict[str, float]:
    """Means of `vae_scores` over `images`: {"recon_mse", "elbo", "nll_iwae", "iwae_k"}."""
    scores = vae_scores(encode, decode, images, k, likelihood, decoder_std)
    return {**{name: float(v.mean()) for name, v in scores.items()}, "iwae_k": float(k)}


def anomaly_auroc(scores: torch.Tensor, is_anomaly: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` (higher = more anomalous) against the truth.

    1.0: every anomaly scores above every normal item; 0.5: chance.
    """
    return float(roc_auc_score(is_anomaly.cpu().numpy().astype(bool), scores.cpu().double().numpy()))
