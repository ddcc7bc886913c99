"""VAE metrics on held-out data: reconstruction error, ELBO, IWAE bound, anomaly AUROC.

The VAE is given as two callables, so any implementation fits:

    encode(x[, labels]) -> (mean, logvar)   the diagonal Gaussian q(z|x); x (N, C, H, W) in [-1, 1]
    decode(z[, labels]) -> decoder output    same shape as x (logits for "bernoulli")

(labels only for a conditional VAE). genlab's VAE network has exactly these methods;
`autoencoder_kl_fns` makes them from a bare diffusers `AutoencoderKL`. The prior is
N(0, I) on those latents, as in the KL term both train with. The decoder likelihood
p(x|z) is "gaussian" (output = mean), "laplace" (output = location) or "bernoulli"
(output = logits of pixels mapped to [0, 1]); the default scales make each one's NLL
equal genlab's VAE loss (`recon_loss` mse / l1 / bce, summed per image) up to a
constant, so at beta=1 the ELBO here is the training objective. Values are nats per
image; compare runs only under the same likelihood.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from genlab.families.contract import Decode, Encode

LIKELIHOODS = ("gaussian", "laplace", "bernoulli")
#: (x - m)^2 is the NLL of N(m, 1/2) and |x - m| that of Laplace(m, 1), up to constants.
DEFAULT_SCALE = {"gaussian": math.sqrt(0.5), "laplace": 1.0}


def autoencoder_kl_fns(vae) -> tuple[Encode, Decode]:
    """(encode, decode) of a diffusers `AutoencoderKL` (unscaled latents, no scaling_factor)."""

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = vae.encode(x).latent_dist
        return posterior.mean, posterior.logvar

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z).sample

    return encode, decode


def log_likelihood(x: torch.Tensor, output: torch.Tensor, likelihood: str = "gaussian",
                   scale: float | None = None) -> torch.Tensor:
    """log p(x | z) per image, (N,), from the decoder's `output` for z."""
    if likelihood == "bernoulli":
        log_p = -F.binary_cross_entropy_with_logits(output, (x + 1) / 2, reduction="none")
    elif likelihood in DEFAULT_SCALE:
        dist = torch.distributions.Normal if likelihood == "gaussian" else torch.distributions.Laplace
        log_p = dist(output, scale or DEFAULT_SCALE[likelihood]).log_prob(x)
    else:
        raise ValueError(f"likelihood={likelihood!r}: use one of {', '.join(LIKELIHOODS)}")
    return log_p.flatten(1).sum(1)


def decoder_image(output: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The decoder output as an image in [-1, 1] units (its mean)."""
    return output.sigmoid() * 2 - 1 if likelihood == "bernoulli" else output


def _log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log density per image, (N,)."""
    log_p = -0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 / logvar.exp())
    return log_p.flatten(1).sum(1)


@torch.no_grad()
def vae_scores(encode: Encode, decode: Decode, images: torch.Tensor, k: int = 16, likelihood: str = "gaussian",
               scale: float | None = None, batch_size: int = 128, seed: int = 0,
               labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image reconstruction error, ELBO and importance-weighted NLL bound.

    With k posterior samples z_i and weights w_i = p(x|z_i) p(z_i) / q(z_i|x):
    ELBO = mean_i log w_i and IWAE = log mean_i w_i (Burda et al. 2016), so
    ELBO <= IWAE <= log p(x) and -IWAE is an upper bound on the NLL that tightens with k.

    Args:
        images: (N, C, H, W) in [-1, 1] on the VAE's device.
        k: importance samples per image.
        likelihood, scale: the decoder likelihood (see the module docstring).
        labels: (N,) for a conditional VAE: passed to encode and decode.

    Returns:
        {"recon_mse": per-pixel MSE of the mean's reconstruction, "elbo": nats,
        "nll_iwae": nats}, each (N,) on the CPU.
    """
    generator = torch.Generator(images.device).manual_seed(seed)
    out = {"recon_mse": [], "elbo": [], "nll_iwae": []}
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        cond = () if labels is None else (labels[start:start + batch_size].to(x.device),)
        mean, logvar = (t.float() for t in encode(x, *cond))
        recon = decoder_image(decode(mean, *cond).float(), likelihood)
        out["recon_mse"].append((recon - x).pow(2).flatten(1).mean(1))
        log_w = []
        for _ in range(k):
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device)
            log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
            log_px = log_likelihood(x.float(), decode(z, *cond).float(), likelihood, scale)
            log_w.append(log_px + log_pz - _log_normal(z, mean, logvar))
        log_w = torch.stack(log_w)  # (k, B)
        out["elbo"].append(log_w.mean(0))
        out["nll_iwae"].append(math.log(k) - log_w.logsumexp(0))
    return {name: torch.cat(v).cpu() for name, v in out.items()}


def vae_metrics(encode: Encode, decode: Decode, images: torch.Tensor, k: int = 16, likelihood: str = "gaussian",
                scale: float | None = None) -> dict[str, float]:
    """Means of `vae_scores` over `images`: {"recon_mse", "elbo", "nll_iwae", "iwae_k"}."""
    scores = vae_scores(encode, decode, images, k, likelihood, scale)
    return {**{name: float(v.mean()) for name, v in scores.items()}, "iwae_k": float(k)}


def anomaly_auroc(scores: torch.Tensor, is_anomaly: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` (higher = more anomalous) against the truth.

    1.0: every anomaly scores above every normal item; 0.5: chance.
    """
    return float(roc_auc_score(is_anomaly.cpu().numpy().astype(bool), scores.cpu().double().numpy()))
