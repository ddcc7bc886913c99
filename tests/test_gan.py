"""GAN family: losses and penalties by hand, diagnostics on synthetic logs, training, export, the CLI."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from PIL import Image

from conftest import assert_same_up_to_rounding, cli, rng
from genlab.errors import ConfigError, GenlabError
from genlab.families import gan as G
from genlab.families.gan import GAN, GanDiagnostics, latent_noise, load_generator

# Tiny networks gain nothing from a second thread and lose a lot when the cores are busy.


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gan(**kwargs) -> GAN:
    torch.manual_seed(0)
    return GAN(**{"image_size": 8, "channels": 1, "latent_dim": 8, "g_channels": 8, "d_channels": 8,
                  "diag_every": 0, **kwargs})


def digits_like(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, 8, 8, generator=g) > 0.6).float() * 2 - 1


T = torch.tensor


# ---- losses --------------------------------------------------------------------------------
def test_losses_on_known_logits():
    ln2 = math.log(2)
    zero = torch.zeros(4)
    assert G.d_loss_nonsaturating(zero, zero).item() == pytest.approx(2 * ln2)
    assert G.d_loss_nonsaturating(T([30.0]), T([-30.0])).item() == pytest.approx(0, abs=1e-6)
    # One-sided smoothing: target 0.9 at sigmoid(logit) = 0.9 costs the Bernoulli entropy of 0.9.
    entropy = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert G.d_loss_nonsaturating(T([math.log(9)]), T([0.0]), real_target=0.9).item() == pytest.approx(entropy + ln2)
    assert G.g_loss_nonsaturating(zero).item() == pytest.approx(ln2)
    assert G.g_loss_nonsaturating(T([-30.0])).item() == pytest.approx(30, rel=1e-6)

    real, fake = T([2.0, 0.5]), T([-2.0, 0.5])
    assert G.d_loss_hinge(real, fake).item() == pytest.approx(0.25 + 0.75)
    assert G.g_loss_hinge(fake).item() == pytest.approx(0.75)
    assert G.d_loss_wgan(T([1.0, 3.0]), T([0.0, -2.0])).item() == pytest.approx(-3.0)
    assert G.g_loss_wgan(T([0.0, -2.0])).item() == pytest.approx(1.0)
    assert G.d_loss_lsgan(T([1.0, 0.0]), T([0.0, 1.0])).item() == pytest.approx(0.5)
    assert G.d_loss_lsgan(T([0.9]), T([0.0]), real_target=0.9).item() == pytest.approx(0.0)
    assert G.g_loss_lsgan(T([0.0, 1.0])).item() == pytest.approx(0.25)


def test_rpgan_losses_on_known_logits():
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731  softplus
    real, fake = T([2.0, 0.0, -1.0]), T([0.0, 1.0, -1.0])
    # Pairs (real_i, fake_i): D wants real_i above fake_i, G wants the opposite.
    assert G.d_loss_rpgan(real, fake).item() == pytest.approx((sp(-2.0) + sp(1.0) + sp(0.0)) / 3)
    assert G.g_loss_rpgan(real, fake).item() == pytest.approx((sp(2.0) + sp(-1.0) + sp(0.0)) / 3)
    # Relativistic: only differences within a pair count, not where the scores sit.
    assert G.d_loss_rpgan(real + 5, fake + 5).item() == pytest.approx(G.d_loss_rpgan(real, fake).item())
    assert G.d_loss_rpgan(real, fake.flip(0)).item() != pytest.approx(G.d_loss_rpgan(real, fake).item())


class QuadraticD(torch.nn.Module):
    """D(x) = c . sum(x^2): dD/dx = 2 c x, so R1 = mean 4 c^2 ||real||^2 and R2 the same at fakes."""

    def __init__(self, c: float = 0.5):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c))

    def forward(self, x, label=None):
        return self.c * x.pow(2).flatten(1).sum(1)


def test_d_loss_adds_r1_at_reals_and_r2_at_fakes():
    gan = tiny_gan(loss="rpgan", r1_gamma=0.3, r2_gamma=0.7, spectral_norm=False)
    gan.discriminator = QuadraticD(0.5)
    real, fake = digits_like(6), 0.5 * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    loss, logs = gan._d_loss(real, fake, None, 0, rng(0))
    d_real, d_fake = 0.5 * real.pow(2).flatten(1).sum(1), 0.5 * fake.pow(2).flatten(1).sum(1)
    r1 = real.pow(2).flatten(1).sum(1).mean()  # (2 c)^2 = 1 with c = 0.5
    r2 = fake.pow(2).flatten(1).sum(1).mean()
    expected = torch.nn.functional.softplus(d_fake - d_real).mean() + 0.3 / 2 * r1 + 0.7 / 2 * r2
    assert logs["r1"].item() == pytest.approx(r1.item(), rel=1e-5)
    assert logs["r2"].item() == pytest.approx(r2.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # the penalties train D: their gradient w.r.t. c is part of the total
    assert gan.discriminator.c.grad is not None


def test_rpgan_generator_loss_pairs_each_fake_with_a_real():
    gan = tiny_gan(arch="r3gan", loss="rpgan", spectral_norm=False)
    gan.discriminator = QuadraticD(0.5)
    batch = {"image": digits_like(8)}
    loss, _ = gan.loss("g", batch, 0, rng(0))
    fake = gan.generator(rng(0).randn(8, 8))  # the same z the G phase drew (its first draw)
    d_real, d_fake = gan.discriminator(batch["image"]), gan.discriminator(fake)
    assert loss.item() == pytest.approx(G.g_loss_rpgan(d_real, d_fake).item(), rel=1e-5)
    loss.backward()
    assert gan.generator.stem.weight.grad.abs().sum() > 0  # G learns from its side of the pairs


def test_gradient_penalty_is_zero_only_for_unit_gradient_norm():
    real, fake = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    w = torch.randn(1, 4, 4)
    w = w / w.norm()
    linear = lambda s: lambda x: s * (x * w).flatten(1).sum(1)  # noqa: E731  D(x) = s w.x, ||grad|| = |s|
    assert G.gradient_penalty(linear(1.0), real, fake, torch.rand(6)).item() == pytest.approx(0, abs=1e-10)
    assert G.gradient_penalty(linear(3.0), real, fake, torch.rand(6)).item() == pytest.approx(4.0, rel=1e-5)  # (3-1)^2
    assert G.gradient_penalty(linear(0.5), real, fake, torch.rand(6)).item() == pytest.approx(0.25, rel=1e-5)


def test_r1_matches_a_hand_computation():
    x = torch.randn(5, 1, 3, 3, requires_grad=True)
    logits = x.pow(2).flatten(1).sum(1)  # dD/dx = 2x  ->  R1 = mean 4 ||x||^2
    expected = (4 * x.detach().pow(2).flatten(1).sum(1)).mean()
    assert G.r1_penalty(logits, x).item() == pytest.approx(expected.item(), rel=1e-6)


def test_diffaugment_keeps_shapes_gradients_and_image_content():
    x = torch.rand(8, 3, 16, 16, requires_grad=True)
    out = G.diff_augment(x, ["color", "translation", "cutout"], rng())
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    moved = G.AUGMENTS["translation"](x.detach(), rng())  # whole-pixel shifts: every value is an input value or padding
    for i in range(8):
        values = set(x[i].detach().flatten().tolist()) | {0.0}
        assert all(min(abs(v - u) for u in values) < 1e-5 for v in moved[i].flatten().tolist()[:64])
    holes = (G.AUGMENTS["cutout"](torch.ones(8, 1, 16, 16), rng()) == 0).flatten(1).sum(1)
    assert (holes > 0).all() and (holes <= 64).all()  # at most an 8x8 square (half the side)


def test_translation_pads_with_the_image_not_with_grey():
    black = -torch.ones(32, 1, 16, 16)  # digits' background
    torch.manual_seed(0)
    grey = G.diff_augment(black, ["translation"], rng(), padding="zeros")
    assert (grey == 0).any()  # DiffAugment's zero padding: mid-grey strips, a value no digit background has
    torch.manual_seed(0)
    assert torch.equal(G.diff_augment(black, ["translation"], rng(), padding="reflection"), black)
    assert torch.equal(G.diff_augment(black, ["translation"], rng()), black)  # reflection is the default
    seen = []  # the family pads by reflection unless told otherwise
    gan = tiny_gan(diffaug="translation")
    gan.discriminator = lambda x, labels=None: seen.append(x) or x.flatten(1).sum(1)
    gan._discriminate(-torch.ones(32, 1, 8, 8), None, 0, rng(0))
    assert torch.equal(seen[0], -torch.ones(32, 1, 8, 8))


# ---- the family ----------------------------------------------------------------------------
def test_r3gan_refuses_spectral_norm_in_one_sentence():
    with pytest.raises(ConfigError, match="model.spectral_norm=false"):
        tiny_gan(arch="r3gan")
    tiny_gan(arch="r3gan", spectral_norm=False)


def test_config_errors():
    with pytest.raises(ConfigError, match="data.num_classes is null"):
        tiny_gan(conditional=True, num_classes=None)
    with pytest.raises(ConfigError, match="hinge"):
        tiny_gan(loss="wasserstein")
    with pytest.raises(ConfigError, match="power of two"):
        tiny_gan(image_size=28)
    with pytest.raises(ConfigError, match="cutout"):
        tiny_gan(diffaug="color,flip")
    with pytest.raises(ConfigError, match="reflection"):
        tiny_gan(diffaug_padding="mirror")
    with pytest.raises(ConfigError, match="nearest"):
        tiny_gan(g_upsample="pixelshuffle")
    with pytest.raises(ConfigError, match="r3gan"):
        tiny_gan(arch="stylegan")


def test_r3gan_networks_start_as_transitions_and_have_no_normalisation():
    gan = tiny_gan(arch="r3gan", loss="rpgan", spectral_norm=False, conditional=True, num_classes=4, image_size=16)
    norms = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.InstanceNorm2d)
    for net in (gan.generator, gan.discriminator):
        assert not any(isinstance(m, norms) for m in net.modules())
        blocks = [m for m in net.modules() if isinstance(m, G.networks._R3Block)]
        assert len(blocks) == 3 * G.R3_BLOCKS  # 4, 8 and 16 px
        for block in blocks:  # zero-initialised last conv: each block starts as the identity
            x = torch.randn(2, block.body[0].in_channels, 4, 4)
            assert torch.equal(block(x), x)
        grouped = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
        assert grouped  # the 3x3 convs are grouped
    labels = torch.tensor([0, 1, 2, 3])
    images = gan.sample(4, seed=0)
    assert images.shape == (4, 1, 16, 16) and images.abs().max() <= 1
    assert gan.discriminator(images, labels).shape == (4,)
    # A sample without BatchNorm does not depend on the rest of its batch.
    assert torch.allclose(gan.generator(torch.ones(3, 8), labels[:3])[:1], gan.generator(torch.ones(1, 8), labels[:1]),
                          atol=1e-6)


def test_eval_variants_show_truncation_against_none():
    assert tiny_gan().eval_variants == {"truncation_1": {"truncation": 1.0}, "truncation_0.5": {"truncation": 0.5}}
    assert tiny_gan(truncation=1.0).eval_variants == {"truncation_0": {"truncation": 0.0},
                                                      "truncation_0.5": {"truncation": 0.5}}


def test_phases_param_groups_and_noise_schedule():
    gan = tiny_gan(n_critic=3, d_lr_scale=2.0, g_lr_scale=0.5, instance_noise=0.2, instance_noise_steps=100)
    assert gan.phases(7) == ["d", "d", "d", "g"]
    groups = gan.param_groups()
    assert groups["d"][0]["lr_scale"] == 2.0 and groups["g"][0]["lr_scale"] == 0.5
    assert groups["d"][0]["betas"] == (0.5, 0.999)
    assert sum(p.numel() for p in groups["g"][0]["params"]) == sum(p.numel() for p in gan.generator.parameters())
    assert [gan._noise_std(s) for s in (0, 50, 100, 500)] == pytest.approx([0.2, 0.1, 0.0, 0.0])


@pytest.mark.parametrize("loss", G.LOSSES)
def test_discriminator_steps_reduce_d_loss(loss):
    gan = tiny_gan(loss=loss, r1_gamma=1.0 if loss == "hinge" else 0.0, label_smoothing=0.1)
    batch = {"image": digits_like()}
    opt = torch.optim.Adam(gan.param_groups()["d"], lr=2e-3, betas=(0.5, 0.999))

    def d_loss():
        torch.manual_seed(1)  # the same fakes (G is not trained here)
        loss_value, logs = gan.loss("d", batch, 0, rng(0))
        return loss_value, logs

    first, logs = d_loss()
    assert {"d_loss", "d_real", "d_fake", "d_acc"} <= logs.keys()
    assert ("gp" in logs) == (loss == "wgan_gp") and ("r1" in logs) == (loss == "hinge")
    for _ in range(15):
        loss_value, _ = d_loss()
        opt.zero_grad()
        loss_value.backward()
        opt.step()
    last, logs = d_loss()
    assert last.item() < first.item() - 0.1, (first.item(), last.item())
    assert logs["d_acc"].item() > 0.9  # a fixed fake batch is easy to tell apart


def test_generator_steps_reduce_g_loss():
    gan = tiny_gan(arch="resnet", loss="hinge")
    batch = {"image": digits_like()}
    opt = torch.optim.Adam(gan.param_groups()["g"], lr=2e-3, betas=(0.5, 0.999))

    def g_loss():
        torch.manual_seed(1)
        return gan.loss("g", batch, 0, rng(0))[0]

    first = g_loss().item()
    for _ in range(10):
        loss_value = g_loss()
        opt.zero_grad()
        loss_value.backward()
        opt.step()
    assert g_loss().item() < first - 0.1


def test_sampling_conditional_and_export_round_trip(tmp_path):
    gan = tiny_gan(conditional=True, num_classes=4, arch="resnet")
    a, b = gan.sample(6, seed=0), gan.sample(6, seed=0)
    assert a.shape == (6, 1, 8, 8) and a.min() >= -1 and a.max() <= 1 and torch.equal(a, b)
    twos, threes = gan.sample(3, seed=0, class_label=2), gan.sample(3, seed=0, class_label=3)
    assert not torch.allclose(twos, threes)
    x, labels = digits_like(4), torch.tensor([0, 1, 2, 3])
    assert not torch.allclose(gan.discriminator(x, labels), gan.discriminator(x, labels.flip(0)))  # projection
    with pytest.raises(GenlabError, match="guidance"):
        gan.sample(2, seed=0, guidance=2.0)
    with pytest.raises(GenlabError, match="out of range"):
        gan.sample(2, seed=0, class_label=4)
    with pytest.raises(GenlabError, match="interpolate"):
        gan.sample(2, seed=0, interpolate=True)

    gan.generator.train()
    gan.loss("d", {"image": x, "label": labels}, 0, rng(0))  # moves BatchNorm statistics: they must be exported too
    gan.export(tmp_path)
    config = json.loads((tmp_path / "generator_config.json").read_text())
    assert config["num_classes"] == 4 and config["arch"] == "resnet"
    generator = load_generator(tmp_path)
    z = torch.randn(4, 8)
    with torch.no_grad():
        assert_same_up_to_rounding(generator(z, labels), gan.generator.eval()(z, labels))  # the reloaded export


def test_truncation_trick_bounds_z_and_keeps_samples_seeded():
    z = latent_noise(2000, 8, seed=0, truncation=0.5)
    assert z.abs().max() <= 0.5 and z.std() > 0.2  # within the bounds, and not collapsed to 0
    assert torch.equal(z, latent_noise(2000, 8, seed=0, truncation=0.5))
    assert latent_noise(2000, 8, seed=0).abs().max() > 2  # 0 = off: a plain normal
    gan = tiny_gan()
    truncated = gan.sample(4, seed=0, truncation=0.5)
    assert torch.equal(truncated, gan.sample(4, seed=0, truncation=0.5))
    assert not torch.allclose(truncated, gan.sample(4, seed=0))
    gan.truncation = 0.5  # model.truncation is the default
    assert torch.equal(truncated, gan.sample(4, seed=0))
    with pytest.raises(GenlabError, match="truncation"):
        gan.sample(2, seed=0, truncation=-1.0)


# ---- diagnostics ---------------------------------------------------------------------------
def feed(diag: GanDiagnostics, d_acc, d_loss, g_loss) -> None:
    for a, d, g in zip(d_acc, d_loss, g_loss):
        diag.record({"d_acc": T(a), "d_loss": T(d)})
        diag.record({"g_loss": T(g)})


def test_diagnostics_warn_when_d_dominates_and_stay_silent_when_balanced(caplog):
    caplog.set_level(logging.WARNING, logger="genlab.families.gan")
    g = torch.Generator().manual_seed(0)
    noisy = lambda mean, spread: (mean + spread * (torch.rand(60, generator=g) - 0.5)).tolist()  # noqa: E731

    balanced = GanDiagnostics(window=50)
    feed(balanced, noisy(0.6, 0.3), noisy(1.3, 0.4), noisy(0.8, 0.4))
    assert balanced.check_balance() is None and not caplog.records

    strong = GanDiagnostics(window=50)
    feed(strong, noisy(0.985, 0.02), noisy(1.0, 0.1), noisy(1.0, 0.1))
    assert "accuracy > 0.95" in strong.check_balance()
    assert len(caplog.records) == 1 and "d_lr_scale" in caplog.records[0].getMessage()
    strong.check_balance()  # the same condition again: not repeated
    assert len(caplog.records) == 1

    winning = GanDiagnostics(window=50)
    steps = torch.linspace(0, 1, 60)
    feed(winning, [0.8] * 60, (1.2 - 0.8 * steps).tolist(), (0.7 + 2.0 * steps).tolist())
    assert "g_loss rose" in winning.check_balance()

    short = GanDiagnostics(window=50)  # not enough history yet: no verdict
    feed(short, [1.0] * 10, [0.1] * 10, [5.0] * 10)
    assert short.check_balance() is None


def test_diagnostics_detect_collapsed_samples(caplog):
    caplog.set_level(logging.WARNING, logger="genlab.families.gan")
    real = digits_like(32)
    diag = GanDiagnostics()
    assert diag.check_diversity(digits_like(64).roll(1, dims=2), real) is None
    collapsed = real[:1].repeat(64, 1, 1, 1) + 0.01 * torch.randn(64, 1, 8, 8)
    assert "diversity collapsed" in diag.check_diversity(collapsed, real)
    assert len(caplog.records) == 1


def test_diagnostics_see_collapse_within_classes():
    # One image per class: as spread out as the data across classes, collapsed within each.
    real, labels = digits_like(40), torch.arange(40) % 4
    diag = GanDiagnostics()
    one_per_class = real[:4].repeat(16, 1, 1, 1) + 0.01 * torch.randn(64, 1, 8, 8)
    fake_labels = torch.arange(64) % 4
    assert diag.check_diversity(one_per_class, real) is None  # blind without labels
    assert "within a class" in diag.check_diversity(one_per_class, real, fake_labels, labels)
    assert "model.mode_seeking" in diag.check_diversity(one_per_class, real, fake_labels, labels)
    varied = digits_like(64).roll(1, dims=2)
    assert GanDiagnostics().check_diversity(varied, real, fake_labels, labels) is None


def test_conditional_family_checks_diversity_per_class():
    gan = tiny_gan(num_classes=4, conditional=True)
    with torch.no_grad():  # G ignores z but not the label: one image per class
        gan.generator.stem.weight[:, :8].zero_()  # the z columns (latent_dim 8); the label's stay
    real, labels = digits_like(40), torch.arange(40) % 4
    assert any("within a class" in m for m in gan.diagnose({"image": real, "label": labels}))


def test_transitional_conditioning_fades_the_label_in():
    with pytest.raises(ConfigError, match="cond_transition"):
        tiny_gan(num_classes=4, conditional=True, cond_transition=[20, 10])
    gan = tiny_gan(num_classes=4, conditional=True, cond_transition=[10, 20])
    assert [gan.cond_scale_at(s) for s in (0, 10, 15, 20, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    batch = {"image": digits_like(8), "label": torch.arange(8) % 4}
    gan.loss("d", batch, 5, rng(5))  # before the transition: the label changes nothing in G or D
    z, x = torch.randn(4, 8), digits_like(4)
    gan.generator.eval(), gan.discriminator.eval()  # fixed BatchNorm statistics and spectral-norm estimates
    assert torch.equal(gan.generator(z, torch.zeros(4, dtype=torch.long)), gan.generator(z, torch.ones(4, dtype=torch.long)))
    assert torch.equal(gan.discriminator(x, torch.zeros(4, dtype=torch.long)),
                       gan.discriminator(x, torch.ones(4, dtype=torch.long)))
    gan.loss("d", batch, 15, rng(15))  # half-way: it does
    assert float(gan.generator.cond_scale) == float(gan.discriminator.cond_scale) == 0.5
    assert not torch.equal(gan.generator(z, torch.zeros(4, dtype=torch.long)),
                           gan.generator(z, torch.ones(4, dtype=torch.long)))
    assert tiny_gan(num_classes=4, conditional=True).cond_scale_at(0) == 1.0  # default: from the start
    switch = tiny_gan(num_classes=4, conditional=True, cond_transition=[10, 10])
    assert [switch.cond_scale_at(s) for s in (0, 9, 10)] == [0.0, 0.0, 1.0]


def test_mode_seeking_term_punishes_a_generator_that_ignores_z():
    z = torch.randn(4, 8)
    same = digits_like(2).repeat(2, 1, 1, 1)
    assert G.mode_seeking_ratio(same[:2], same[2:], z[:2], z[2:]) == 0
    assert G.mode_seeking_ratio(digits_like(2), -digits_like(2), z[:2], z[2:]) > 0
    batch = {"image": digits_like(8), "label": torch.arange(8) % 4}
    torch.manual_seed(0)
    plain = tiny_gan(num_classes=4, conditional=True).loss("g", batch, 1, rng(1))
    gan = tiny_gan(num_classes=4, conditional=True, mode_seeking=1.0)
    with torch.no_grad():  # G ignores z: one image per class
        gan.generator.stem.weight[:, :8].zero_()
    torch.manual_seed(0)
    loss, logs = gan.loss("g", batch, 1, rng(1))
    assert float(logs["ms_ratio"]) == 0 and loss.item() > 1e4 + plain[0].item()  # weight / (0 + 1e-5)
    # The diagnostics still pair the real batch with its own labels (odd batch: one fake fewer).
    gan.diag_every = 1
    odd = {"image": digits_like(9), "label": torch.arange(9) % 4}
    assert any("within a class" in m for m in gan.diagnose(odd))
    gan.loss("g", odd, 1, rng(1))


def test_same_class_distance_by_hand():
    x = torch.tensor([0.0, 1.0, 0.5, 3.0]).view(4, 1, 1, 1)
    assert G.same_class_distance(x, torch.tensor([0, 1, 0, 1])).item() == pytest.approx((0.5 + 2.0) / 2)
    assert G.same_class_distance(x).item() == pytest.approx((1 + 0.5 + 3 + 0.5 + 2 + 2.5) / 6)
    assert G.same_class_distance(x, torch.arange(4)).item() == math.inf  # no pair: no cap


def test_mode_seeking_stops_rewarding_spread_beyond_the_datas():
    labels = torch.arange(8) % 4  # pairs (i, i + 4) share a class, as the G phase pairs its fakes

    def g_loss(images, cap):
        gan = tiny_gan(num_classes=4, conditional=True, mode_seeking=1.0, mode_seeking_cap=cap)
        torch.manual_seed(0)
        loss, logs = gan.loss("g", {"image": images, "label": labels}, 1, rng(1))
        return loss.item(), logs["ms_ratio"].item()

    varied = digits_like(8)
    z = rng(1).randn(8, 8)  # the G phase's z (its first draw): pairs (z_i, z_{i+4})
    at_data_spread = (z[:4] - z[4:]).abs().mean() / (varied[:4] - varied[4:]).abs().mean()
    unbounded, ratio = g_loss(varied, cap=False)
    capped, _ = g_loss(varied, cap=True)
    assert 1 / ratio > at_data_spread  # an untrained G spreads less than the data: still pushed, less
    assert capped == pytest.approx(unbounded - at_data_spread.item(), rel=1e-4)
    alike = digits_like(4).repeat(2, 1, 1, 1) + 1e-4 * torch.randn(8, 1, 8, 8)  # reals of a class all but equal
    unbounded, ratio = g_loss(alike, cap=False)
    capped, _ = g_loss(alike, cap=True)
    assert capped == pytest.approx(unbounded - 1 / (ratio + 1e-5), rel=1e-4)  # fakes spread more: no reward


def test_cli_train_and_sample(tmp_path):
    run = tmp_path / "gan"
    cli("train", "model=gan", "trainer=debug", "logger=none", "data.image_size=8", "model.g_channels=8",
        "model.d_channels=8", "model.conditional=true", f"hydra.run.dir={run}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = {"d_loss", "g_loss", "d_real", "d_fake", "d_acc", "grad_norm_d", "grad_norm_g", "lr_d", "lr_g"}
    assert len(rows) == 4 and all(keys <= r.keys() for r in rows)
    assert (run / "samples" / "final.png").exists()
    assert load_generator(run / "export")(torch.randn(2, 64), torch.tensor([1, 2])).shape == (2, 1, 8, 8)
    out = tmp_path / "grid.png"
    cli("sample", str(run), "--n", "4", "--class", "3", "--out", str(out))
    assert Image.open(out).size == (2 * 9 + 1, 2 * 9 + 1)
