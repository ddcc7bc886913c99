"""VAE metrics through the Evaluator: genlab's VAE family and a bare diffusers AutoencoderKL."""

import math

import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf

from genlab.data.digits import Digits
from genlab.eval.evaluate import Evaluator
from genlab.eval.vae_metrics import vae_scores
from genlab.families.vae import VAE
from conftest import rng

TINY = dict(image_size=16, channels=1, block_out_channels=[8, 16], norm_num_groups=4, latent_channels=2,
            mid_block_attention=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("genlab_cache")


def tiny_vae(**kwargs) -> VAE:
    torch.manual_seed(0)
    return VAE(**{**TINY, **kwargs})


def test_the_vae_declares_the_likelihood_it_trains():
    assert tiny_vae().autoencoder()[2] == "gaussian"
    assert tiny_vae(recon_loss="l1").autoencoder()[2] == "laplace"
    assert tiny_vae(recon_loss="bce").autoencoder()[2] == "bernoulli"


@pytest.mark.parametrize("recon_loss", ["mse", "l1", "bce"])
def test_elbo_is_the_vae_training_objective_at_beta_one(recon_loss):
    """-ELBO (nats per image) = the family's loss x C*H*W + the likelihood's constant."""
    family = tiny_vae(recon_loss=recon_loss, kl_warmup_steps=0)
    family.vae.eval()
    x = Digits("val", 16, 1).images[:16]
    encode, decode, likelihood = family.autoencoder()
    elbo = vae_scores(encode, decode, x, k=32, likelihood=likelihood)["elbo"].mean()
    draws = rng()  # each loss call draws new posterior noise from it
    loss = torch.stack([family.loss("vae", {"image": x}, 0, draws)[0] for _ in range(32)]).mean() * x[0].numel()
    constant = {"mse": 0.5 * math.log(math.pi), "l1": math.log(2.0), "bce": 0.0}[recon_loss] * x[0].numel()
    # Both are Monte Carlo estimates (they agree to ~0.2%); a wrong likelihood scale or a
    # dropped constant would be 30% or more off.
    assert -elbo.item() == pytest.approx(loss.item() + constant, rel=0.01)


def test_autoencoder_kl_bounds_are_ordered():
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), norm_num_groups=8,
                        latent_channels=2, sample_size=16).eval()
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    def encode(x):
        posterior = vae.encode(x).latent_dist
        return posterior.mean, posterior.logvar

    scores = vae_scores(encode, lambda z: vae.decode(z).sample, x, k=8)
    assert all(v.shape == (6,) and torch.isfinite(v).all() for v in scores.values())
    assert (scores["elbo"] <= -scores["nll_iwae"] + 1e-3).all()  # Jensen, per image, same samples


@pytest.mark.parametrize("conditional", [False, True])
def test_evaluator_adds_vae_metrics_and_anomaly_auroc(cache_dir, conditional):
    cfg = OmegaConf.create({
        "data": {"_target_": "genlab.data.digits.Digits", "image_size": 16, "channels": 1, "exclude_classes": [0]},
        "eval": {"cache_dir": str(cache_dir), "n_samples": 64, "iwae_k": 4},
    })
    family = tiny_vae(conditional=conditional, num_classes=10)
    family.vae.train()
    metrics = Evaluator(cfg).evaluate(family)
    assert family.vae.training  # put back in train mode after evaluating
    assert {"recon_mse", "elbo", "nll_iwae", "anomaly_auroc", "fid_digits_cnn", "classes_covered"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["elbo"] <= -metrics["nll_iwae"] and 0 <= metrics["anomaly_auroc"] <= 1
    assert metrics["iwae_k"] == 4 and metrics["classes_total"] == 9  # class 0 is not in the train data


@pytest.mark.slow  # 15 s: trains a VAE without one digit (test_evaluator_adds_vae_metrics... checks the metric is there)
def test_anomaly_auroc_ranks_the_held_out_kind_as_anomalous(cache_dir):
    """A VAE trained on blobs: val noise images (the excluded class 0) score as anomalies (AUROC ~1, not ~0)."""
    from genlab.data.tensor_images import TensorImages
    from test_vae import blobs

    torch.manual_seed(0)
    family = VAE(**{**TINY, "image_size": 8}, kl_warmup_steps=0, beta=0.1)
    opt = torch.optim.Adam(family.param_groups()["vae"], lr=3e-3)
    data = {"image": blobs(32)}
    for step in range(60):
        loss, _ = family.loss("vae", data, step, rng(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    noise = torch.rand(8, 1, 8, 8) * 2 - 1
    train = TensorImages(blobs(32, seed=1), torch.ones(32, dtype=torch.long))
    val = TensorImages(torch.cat([blobs(8, seed=2), noise]), torch.tensor([1] * 8 + [0] * 8))
    cfg = OmegaConf.create({"data": {"_target_": "blobs", "image_size": 8, "channels": 1, "exclude_classes": [0]},
                            "eval": {"cache_dir": str(cache_dir), "n_samples": 16, "iwae_k": 4, "extractor": "digits_cnn"}})
    metrics = Evaluator(cfg, datasets=(train, val)).evaluate(family)
    assert metrics["anomaly_auroc"] > 0.95
