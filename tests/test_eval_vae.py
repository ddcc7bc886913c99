"""VAE metrics through the Evaluator, with a tiny diffusers AutoencoderKL (the VAE export format)."""

import math

import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf

from genlab.eval.evaluate import Evaluator, find_autoencoder
from genlab.eval.vae_metrics import autoencoder_kl_fns, vae_scores


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), norm_num_groups=8,
                         latent_channels=2, sample_size=16)


class VAEFamily:
    def __init__(self):
        self.vae = tiny_vae()

    def networks(self):
        return {"vae": self.vae}

    @torch.no_grad()
    def sample(self, n, seed, **options):
        z = torch.randn(n, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
        return self.vae.decode(z).sample.clamp(-1, 1)


def test_autoencoder_kl_bounds_are_ordered():
    vae = tiny_vae().eval()
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    scores = vae_scores(*autoencoder_kl_fns(vae), x, k=8)
    assert all(v.shape == (6,) and torch.isfinite(v).all() for v in scores.values())
    assert (scores["elbo"] <= -scores["nll_iwae"] + 1e-3).all()  # Jensen, per image, same samples


def test_evaluator_adds_vae_metrics_and_anomaly_auroc(tmp_path):
    cfg = OmegaConf.create({
        "data": {"_target_": "genlab.data.digits.Digits", "image_size": 16, "channels": 1, "exclude_classes": [0]},
        "eval": {"cache_dir": str(tmp_path), "n_samples": 64, "iwae_k": 4},
    })
    family = VAEFamily()
    family.vae.train()
    assert find_autoencoder(family) is family.vae
    metrics = Evaluator(cfg).evaluate(family)
    assert family.vae.training  # put back in train mode after evaluating
    assert {"recon_mse", "elbo", "nll_iwae", "anomaly_auroc", "fid_digits_cnn", "classes_covered"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["elbo"] <= -metrics["nll_iwae"] and 0 <= metrics["anomaly_auroc"] <= 1
    assert metrics["iwae_k"] == 4 and metrics["classes_total"] == 9  # class 0 is not in the train data
