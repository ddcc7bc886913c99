"""VAE family: the ELBO terms by hand, sampling options, anomaly scores, the export, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch.distributions import Normal, kl_divergence

from conftest import cli, rng
from genlab.eval.vae_metrics import vae_scores
from genlab.errors import ConfigError, GenlabError
from genlab.families.vae import VAE, kl_standard_normal, recon_error



pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(image_size=8, channels=1, block_out_channels=[8, 16], norm_num_groups=4, latent_channels=2,
            mid_block_attention=False)


def tiny_vae(**kwargs) -> VAE:
    torch.manual_seed(0)
    return VAE(**{**TINY, **kwargs})


def blobs(n: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth 8x8 bright squares at random places on a dark background, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 8, 8)
    for i, (r, c) in enumerate(torch.randint(0, 5, (n, 2), generator=g).tolist()):
        x[i, :, r:r + 3, c:c + 3] = 1.0
    return x


def test_kl_matches_the_closed_form_and_enters_the_loss_with_warmed_up_beta():
    vae = tiny_vae(beta=2.0, kl_warmup_steps=100)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    mean, logvar = vae.vae.encode(x)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(kl_standard_normal(mean, logvar), expected, rtol=1e-5)
    # Large posteriors too (not just what a fresh encoder outputs).
    m, lv = torch.randn(3, 2, 4, 4) * 3, torch.randn(3, 2, 4, 4) * 2
    ref = kl_divergence(Normal(m, (0.5 * lv).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(kl_standard_normal(m, lv), ref, rtol=1e-5)

    loss, logs = vae.loss("vae", {"image": x}, 50, rng(50))  # half-way through the warm-up: beta = 1.0
    assert torch.allclose(logs["kl"], expected.mean() / 64, rtol=1e-5)  # per image value (64 = 1x8x8)
    assert logs["beta"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(logs["recon_loss"].item() + logs["kl"].item(), rel=1e-5)
    assert vae.beta_at(0) == 0.0 and vae.beta_at(100) == vae.beta_at(10_000) == 2.0


def test_reconstruction_errors_by_hand():
    decoded, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert recon_error(decoded, target, "mse").tolist() == [4.0, 4.0]
    assert recon_error(decoded - 1, target, "l1").tolist() == [8.0, 8.0]
    # bce: logit 0 means p = 0.5 for every pixel of a white (target 1) image
    assert recon_error(decoded, target, "bce") == pytest.approx([4 * math.log(2)] * 2)


def test_training_reduces_the_loss_and_separates_anomalies():
    vae = tiny_vae(kl_warmup_steps=0, beta=0.1)
    data = {"image": blobs(32)}

    def loss_now():
        torch.manual_seed(1)  # the same posterior noise each time
        return vae.loss("vae", data, 0, rng(0))[0].item()

    before = loss_now()
    opt = torch.optim.Adam(vae.param_groups()["vae"], lr=3e-3)
    for step in range(60):
        loss, _ = vae.loss("vae", data, step, rng(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = loss_now()
    assert after < 0.5 * before, (before, after)
    # Anomaly score (what genlab eval computes: the IWAE NLL): training-like images score lower than noise.
    encode, decode, likelihood = vae.autoencoder()
    with torch.no_grad():
        normal = vae_scores(encode, decode, blobs(8, seed=5), k=4, likelihood=likelihood)["nll_iwae"]
        noise = vae_scores(encode, decode, torch.rand(8, 1, 8, 8) * 2 - 1, k=4, likelihood=likelihood)["nll_iwae"]
    assert normal.shape == (8,) and normal.max() < noise.min()
    # The running latent variance (the export's scaling factor) matches the posterior samples' spread.
    with torch.no_grad():
        mean, logvar = encode(data["image"])
        measured = 1 / (mean + torch.randn_like(mean) * (0.5 * logvar).exp()).std().item()
    running = 1 / math.sqrt(vae.vae.latent_var.item())
    assert 0.7 < measured / running < 1.4


def test_prior_samples_are_seeded_and_in_range():
    vae = tiny_vae()
    a, b, c = vae.sample(6, seed=0), vae.sample(6, seed=0), vae.sample(6, seed=1)
    assert a.shape == (6, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    bce = tiny_vae(recon_loss="bce").sample(4, seed=0)
    assert bce.min() > -1 and bce.max() < 1  # sigmoid of logits, rescaled


def test_temperature_scales_the_prior():
    vae = tiny_vae()
    frozen = vae.sample(4, seed=0, temperature=0.0)  # every z is the prior mean: one image four times
    assert all(torch.equal(frozen[0], image) for image in frozen)
    assert torch.equal(vae.sample(4, seed=0, temperature=1.0), vae.sample(4, seed=0))  # model.temperature = 1
    assert not torch.equal(tiny_vae(temperature=0.5).sample(4, seed=0), vae.sample(4, seed=0))


def test_interpolation_and_reconstruction_grids():
    vae = tiny_vae()
    walk = vae.sample(8, seed=0, interpolate=True, steps=4)  # 2 rows of 4
    assert walk.shape == (8, 1, 8, 8)
    images = blobs(4)
    mean = vae.vae.encode(images)[0]
    ends = vae._to_image(vae.vae.decode(mean))
    between = vae.sample(8, seed=0, interpolate=True, steps=4, images=images)  # rows: 0->1, 2->3
    assert torch.allclose(between[[0, 3, 4, 7]], ends, atol=1e-5)  # each row starts and ends at an image
    assert not torch.allclose(between[1], between[0])
    recon = vae.sample(8, seed=0, reconstruct=True, images=images)
    assert torch.equal(recon[0::2], images) and torch.allclose(recon[1::2], ends, atol=1e-5)
    with pytest.raises(GenlabError, match="images"):
        vae.sample(4, seed=0, reconstruct=True)


def test_options_that_do_not_apply_are_refused():
    vae = tiny_vae()
    with pytest.raises(GenlabError, match="sampler"):
        vae.sample(2, seed=0, sampler="ddim")
    with pytest.raises(GenlabError, match="guidance"):
        vae.sample(2, seed=0, guidance=3.0)
    with pytest.raises(GenlabError, match="conditional"):
        vae.sample(2, seed=0, class_label=1)
    assert vae.sample(2, seed=0, guidance=None, sampler=None).shape == (2, 1, 8, 8)  # unset CLI options


def test_conditional_vae_uses_labels():
    with pytest.raises(ConfigError, match="data.num_classes is null"):
        VAE(**TINY, conditional=True, num_classes=None)
    vae = tiny_vae(conditional=True, num_classes=3)
    x = blobs(4)
    loss, logs = vae.loss("vae", {"image": x, "label": torch.tensor([0, 1, 2, 0])}, 0, rng(0))
    assert torch.isfinite(loss)
    with pytest.raises(GenlabError, match="label"):
        vae.loss("vae", {"image": x}, 0, rng(0))
    threes, ones = vae.sample(4, seed=0, class_label=2), vae.sample(4, seed=0, class_label=1)
    assert threes.shape == (4, 1, 8, 8) and not torch.allclose(threes, ones)
    with pytest.raises(GenlabError, match="out of range"):
        vae.sample(2, seed=0, class_label=3)


def test_conditional_prior_samples_follow_the_label():
    # Class 0: a blob in the top-left corner, class 1: bottom-right. After a short training,
    # prior samples of each class must put their blob where that class has it.
    def corner_blobs(label: int, n: int, seed: int) -> torch.Tensor:
        return blobs(n, seed).roll((-2, -2) if label == 0 else (2, 2), dims=(2, 3))

    vae = tiny_vae(conditional=True, num_classes=2, kl_warmup_steps=0)
    optimizer = torch.optim.Adam(vae.vae.parameters(), lr=3e-3)
    for step in range(150):
        x = torch.cat([corner_blobs(0, 8, step), corner_blobs(1, 8, step)])
        loss, _ = vae.loss("vae", {"image": x, "label": torch.tensor([0] * 8 + [1] * 8)}, step, rng(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    top_left = lambda x: x[..., :4, :4].mean().item()  # noqa: E731
    bottom_right = lambda x: x[..., 4:, 4:].mean().item()  # noqa: E731
    zeros, ones = vae.sample(32, seed=1, class_label=0), vae.sample(32, seed=1, class_label=1)
    assert top_left(zeros) - bottom_right(zeros) > 0.3
    assert bottom_right(ones) - top_left(ones) > 0.3


def test_export_is_a_plain_autoencoderkl_with_the_measured_scaling_factor(tmp_path):
    vae = tiny_vae()
    vae.vae.latent_var.fill_(0.25)  # as if training latents had std 0.5
    factor = 2.0
    vae.export(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config.scaling_factor == pytest.approx(factor)
    x = blobs(2)
    with torch.no_grad():
        ours = vae.vae.decode(vae.vae.encode(x)[0])
        theirs = loaded.decode(loaded.encode(x).latent_dist.mode()).sample
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_cli_train_sample_interpolate_reconstruct(tmp_path):
    run = tmp_path / "vae"
    cli("train", "model=vae", "trainer=debug", "logger=none", "data.image_size=8",
        "model.block_out_channels=[8,16]", "model.norm_num_groups=4", f"hydra.run.dir={run}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"loss", "recon_loss", "kl", "beta", "grad_norm_vae"} <= r.keys() for r in rows)
    assert (run / "samples" / "final.png").exists()
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] > 0
    for option in ("--interpolate", "--reconstruct"):  # plain `genlab sample` is covered in test_gan.py
        out = tmp_path / f"grid{option}.png"
        cli("sample", str(run), "--n", "4", "--out", str(out), option)
        assert Image.open(out).size == (2 * 9 + 1, 2 * 9 + 1)  # 2x2 grid of 8 px images, 1 px padding
