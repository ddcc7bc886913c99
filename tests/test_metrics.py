"""Metrics library (genlab.eval): each test checks that a metric moves the right way."""

import math
from urllib.error import URLError

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import genlab.eval.features as features
from genlab.data.digits import Digits
from genlab.data.fill_circles import COLOUR_NAMES, PALETTE, FillCircles, caption_for, render_circle
from genlab.errors import ConfigError, GenlabError
from genlab.eval.control_metrics import control_metrics, disc_colour_name, disc_iou, edge_f1, fill_colour_from_caption
from genlab.eval.evaluate import EvalConfig, Evaluator
from genlab.eval.metrics import (border_artifact_rate, border_energy, cached_reference, class_agreement,
                                 class_coverage, extract, feature_metrics, frechet_distance, kernel_distance,
                                 precision_recall, rejection_rate)
from genlab.eval.plots import plot_quality_vs_steps
from genlab.eval.vae_metrics import anomaly_auroc, vae_scores
from conftest import assert_same_up_to_rounding

NOISE = (0.1, 0.2, 0.4, 0.8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("genlab_cache")


@pytest.fixture(scope="module")
def trained(cache_dir):
    """The 16 px grey DigitsCNN, trained into the module's cache, and how often training ran."""
    calls = []
    real_train = features.train_digits_cnn
    features.train_digits_cnn = lambda *a, **k: calls.append(a) or real_train(*a, **k)
    try:
        model = features.load_or_train_digits_cnn(16, 1, cache_dir)
    finally:
        features.train_digits_cnn = real_train
    return model, calls


@pytest.fixture(scope="module")
def digit_features(trained):
    """Features of two disjoint random halves A, B of the train digits, and of noisy/shifted copies."""
    model, _ = trained
    images = Digits("train", 16, 1).images
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    a, b = images[perm[:800]], images[perm[800:1600]]
    g = torch.Generator().manual_seed(1)
    noisy = lambda x, s: (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)  # noqa: E731
    return {
        "a": extract(model, a)[0], "b": extract(model, b)[0],
        "a_noisy": [extract(model, noisy(a, s))[0] for s in NOISE],
        "b_noisy": [extract(model, noisy(b, s))[0] for s in NOISE],
        "a_shifted": extract(model, torch.roll(a, 3, dims=3))[0],
    }


def test_digits_cnn_is_accurate_trained_once_then_loaded(trained, cache_dir, monkeypatch):
    model, calls = trained
    assert len(calls) == 1 and model.val_accuracy > 0.97
    val = Digits("val", 16, 1)
    assert features.accuracy(model, val.images, val.labels) == pytest.approx(model.val_accuracy)
    assert (cache_dir / f"{model.cache_tag}.pt").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the weights are cached")

    monkeypatch.setattr(features, "train_digits_cnn", no_training)
    again = features.load_or_train_digits_cnn(16, 1, cache_dir)
    assert again.val_accuracy == model.val_accuracy
    x = Digits("val", 16, 1).images[:8]
    assert_same_up_to_rounding(extract(again, x)[0], extract(model, x)[0])  # reloaded weights, same features


@pytest.fixture(scope="module")
def mlp(cache_dir):
    """The second digits classifier (an MLP on 8x8 pixels), trained into the module's cache."""
    return features.load_or_train_digits_classifier("digits_mlp", 16, 1, cache_dir)


def test_second_classifier_is_another_kind_accurate_and_cached(trained, mlp, cache_dir, monkeypatch):
    cnn, _ = trained
    assert mlp.val_accuracy > 0.96 and (cache_dir / f"{mlp.cache_tag}.pt").exists()
    assert not any(isinstance(m, torch.nn.Conv2d) for m in mlp.modules())  # not a CNN: one weight per pixel
    assert mlp.work_size == 8 and cnn.work_size == 16
    monkeypatch.setattr(features, "train_digits_mlp", lambda *a, **k: pytest.fail("trained again"))
    again = features.load_or_train_digits_classifier("digits_mlp", 16, 1, cache_dir)
    x = Digits("val", 16, 1).images[:8]
    assert_same_up_to_rounding(extract(again, x)[1], extract(mlp, x)[1])
    # Independent networks: they agree on real digits, not on noise.
    val = Digits("val", 16, 1).images
    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert class_agreement(extract(cnn, val)[1], extract(mlp, val)[1]) > 0.95
    assert class_agreement(extract(cnn, noise)[1], extract(mlp, noise)[1]) < 0.6


def test_mlp_augmentation_rotates_digits_and_keeps_the_background_black():
    g = torch.Generator().manual_seed(0)
    black = -torch.ones(8, 1, 16, 16)
    assert torch.allclose(features._rotate_and_scale(black, g), black)  # what it uncovers is background, not grey
    digits = Digits("val", 16, 1).images[:8]
    moved = features._rotate_and_scale(digits, g)
    assert not torch.allclose(moved, digits, atol=0.1) and moved.min() >= -1 and moved.max() <= 1


def test_rejection_rate_against_real_confidences():
    def logits_with_confidence(p):  # 2 classes: softmax max = p
        p = torch.tensor(p)
        return torch.stack([p.log(), (1 - p).log()], 1)

    real = logits_with_confidence([0.6] + [0.99] * 19)  # 5% of reals below 0.99
    assert rejection_rate(real, real) == pytest.approx(0.05)
    # Threshold: the reals' 5% quantile, 0.6 + 0.95 x (0.99 - 0.6) = 0.9705 (linear interpolation).
    fake = logits_with_confidence([0.55, 0.7, 0.96, 0.98, 0.995])
    assert rejection_rate(fake, real) == pytest.approx(0.6)


def test_border_artifacts_flag_bright_edges_not_bright_centres():
    train, val = Digits("train", 16, 1).images, Digits("val", 16, 1).images
    reference = border_energy(train)
    assert border_energy(-torch.ones(1, 1, 16, 16)).tolist() == [[0.0] * 4]
    assert border_artifact_rate(val, reference) < 0.05  # real digits rarely trip it
    left_block, centre_block = val.clone(), val.clone()
    left_block[:, :, 4:12, :2] = 1.0  # a bright 8x2 block on the left edge
    centre_block[:, :, 4:12, 7:9] = 1.0
    assert border_artifact_rate(left_block, reference) == 1.0
    assert border_artifact_rate(centre_block, reference) < 0.05


def test_extractor_plugs_into_torchmetrics(trained):
    from torchmetrics.image.fid import FrechetInceptionDistance

    model, _ = trained
    images = Digits("val", 16, 1).images
    real, fake = images[:90], images[90:]
    fid = FrechetInceptionDistance(feature=model, normalize=True)  # float images in [0, 1]
    fid.update((real + 1) / 2, real=True)
    fid.update((fake + 1) / 2, real=False)
    assert float(fid.compute()) == pytest.approx(frechet_distance(extract(model, real)[0], extract(model, fake)[0]),
                                                 rel=1e-3)


def test_fid_zero_on_itself_and_grows_with_noise(digit_features):
    f = digit_features
    assert abs(frechet_distance(f["a"], f["a"])) < 1e-3
    fids = [frechet_distance(f["a"], x) for x in f["a_noisy"]]
    assert fids[0] > 1e-3 and all(lo < hi for lo, hi in zip(fids, fids[1:])), fids
    assert frechet_distance(f["a"], f["b"]) < fids[-1] / 10  # another sample of the same data is close


def test_kid_near_zero_for_same_data_and_grows_with_noise(digit_features):
    f = digit_features
    kids = [kernel_distance(f["a"], x)[0] for x in f["b_noisy"]]
    assert all(lo < hi for lo, hi in zip(kids, kids[1:])), kids
    assert abs(kernel_distance(f["a"], f["b"])[0]) < kids[-1] / 50
    assert kernel_distance(f["a"], f["b"]) == kernel_distance(f["a"], f["b"])  # seeded subsets


def test_kid_equals_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(300, 16, generator=g), torch.rand(250, 16, generator=g) + 0.05
    kid = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=20, subset_size=200)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    torch.manual_seed(3)  # torchmetrics draws its subsets from the global RNG
    expected = [float(v) for v in kid.compute()]
    assert kernel_distance(real, fake, subset_size=200, subsets=20, seed=3) == pytest.approx(expected, rel=1e-5)


def test_precision_recall_one_on_itself_and_drop_when_shifted(digit_features):
    f = digit_features
    assert precision_recall(f["a"], f["a"]) == (1.0, 1.0)
    clean = precision_recall(f["a"], f["b"])
    assert min(clean) > 0.8
    assert max(precision_recall(f["a"], f["a_shifted"])) < 0.5
    noisy_p, noisy_r = precision_recall(f["a"], f["b_noisy"][-1])
    assert noisy_p < clean[0] - 0.2 and noisy_r < clean[1] - 0.2


def test_precision_recall_tell_mode_dropping_from_bad_samples():
    real = torch.randn(600, 8, generator=torch.Generator().manual_seed(0))
    half = real[real[:, 0] > 0]  # realistic samples, but only half the modes
    precision, recall = precision_recall(real, half)
    assert precision > 0.95 and recall < 0.85
    precision, recall = precision_recall(real, real + 3.0)  # off-manifold samples
    assert precision < 0.1 and recall < 0.1


def test_feature_metrics_are_named_by_extractor(digit_features):
    names = set(feature_metrics(digit_features["a"], digit_features["b"], "digits_cnn"))
    assert names == {"fid_digits_cnn", "kid_digits_cnn", "kid_std_digits_cnn", "precision_digits_cnn",
                     "recall_digits_cnn"}


def test_class_coverage_drops_for_one_class(trained):
    model, _ = trained
    data = Digits("train", 16, 1)
    all_classes = class_coverage(extract(model, data.images)[1], data.labels)
    assert all_classes["classes_covered"] == 10 and all_classes["classes_total"] == 10
    assert all_classes["class_kl"] < 0.01 and all_classes["class_confidence"] > 0.9
    threes = class_coverage(extract(model, data.images[data.labels == 3])[1], data.labels)
    assert threes["classes_covered"] <= 3 and threes["class_kl"] > 1.5


def test_class_coverage_exact_on_synthetic_logits():
    labels = torch.arange(10).repeat(10)  # uniform data
    one_class = torch.full((50, 10), -10.0)
    one_class[:, 4] = 10.0
    out = class_coverage(one_class, labels)
    assert out["classes_covered"] == 1 and out["class_kl"] == pytest.approx(math.log(10))
    assert out["class_confidence"] == pytest.approx(1.0, abs=1e-6)
    uniform = class_coverage(torch.eye(10).repeat(5, 1) * 20, labels)
    assert uniform["classes_covered"] == 10 and uniform["class_kl"] == pytest.approx(0.0, abs=1e-9)


def test_reference_statistics_computed_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"features": torch.ones(3, 2)}

    path = tmp_path / "ref.pt"
    first, second = cached_reference(path, compute), cached_reference(path, compute)
    assert len(calls) == 1 and torch.equal(first["features"], second["features"])


def _linear_vae(posterior_std_factor=1.0, mean_shift=0.0):
    """x = W z + N(0, s^2): exact log p(x) is known, and with W's orthogonal columns so is q(z|x)."""
    w, s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]), 0.5  # W^T W = diag(1, 4)
    post_cov = torch.linalg.inv(torch.eye(2) + w.T @ w / s**2)

    def encode(x):
        mean = x.flatten(1) @ w / s**2 @ post_cov + mean_shift
        return mean, (post_cov.diagonal() * posterior_std_factor**2).log().expand_as(mean)

    def decode(z):
        return (z @ w.T).view(-1, 1, 2, 2)

    def log_px(x):
        cov = w @ w.T + s**2 * torch.eye(4)
        return torch.distributions.MultivariateNormal(torch.zeros(4), cov).log_prob(x.flatten(1))

    return encode, decode, log_px, s


def test_vae_bounds_exact_for_true_posterior_and_ordered_otherwise():
    x = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    encode, decode, log_px, s = _linear_vae()
    exact = vae_scores(encode, decode, x, k=4, scale=s)
    assert torch.allclose(exact["elbo"], log_px(x), atol=1e-4)
    assert torch.allclose(-exact["nll_iwae"], log_px(x), atol=1e-4)
    encode, decode, log_px, s = _linear_vae(posterior_std_factor=2.0, mean_shift=0.5)
    loose, tight = (vae_scores(encode, decode, x, k=k, scale=s) for k in (2, 256))
    elbo, iwae2, truth = loose["elbo"].mean(), -loose["nll_iwae"].mean(), log_px(x).mean()
    iwae256 = -tight["nll_iwae"].mean()
    # The IWAE bound holds in expectation; its Monte Carlo estimate may overshoot a little.
    assert elbo < iwae2 < iwae256 < truth + 0.05 and abs(truth - iwae256) < (truth - elbo) / 10


def test_anomaly_auroc():
    assert anomaly_auroc(torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0]), torch.tensor([0, 0, 0, 1, 1])) == 1.0
    assert anomaly_auroc(torch.tensor([10.0, 11.0, 1.0]), torch.tensor([0, 0, 1])) == 0.0


def _render(size, cx, cy, r, fill, background, noise=0.0, seed=0):
    image = torch.from_numpy(render_circle(size, cx, cy, r, fill, background)[0]).permute(2, 0, 1).float() / 127.5 - 1
    return (image + noise * torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def test_disc_iou_and_edges_perfect_then_shifted():
    item = FillCircles("val", 32)[3]
    assert disc_iou(item["image"], item["circle"]) == 1.0
    assert edge_f1(item["image"], item["sketch"]) > 0.95
    shifted = torch.roll(item["image"], 4, dims=2)
    assert disc_iou(shifted, item["circle"]) < 0.75 and edge_f1(shifted, item["sketch"]) < 0.5
    blank = torch.zeros(3, 32, 32)
    assert disc_iou(blank, item["circle"]) == 0.0 and edge_f1(blank, item["sketch"]) == 0.0


def test_caption_colour_accuracy_on_synthetic_discs():
    pairs = [(f, b) for f in COLOUR_NAMES for b in COLOUR_NAMES if f != b]
    images = torch.stack([_render(32, 14, 17, 8, f, b, noise=0.1, seed=i) for i, (f, b) in enumerate(pairs)])
    assert [disc_colour_name(im, PALETTE) for im in images] == [f for f, _ in pairs]
    assert fill_colour_from_caption("a magenta circle on a red background", PALETTE) == "magenta"
    right = control_metrics(images, {"caption": [caption_for(f, b) for f, b in pairs]}, PALETTE)
    swapped = control_metrics(images, {"caption": [caption_for(b, f) for f, b in pairs]}, PALETTE)
    assert right == {"colour_accuracy": 1.0} and swapped == {"colour_accuracy": 0.0}


def test_plot_quality_vs_steps(tmp_path):
    import matplotlib.image

    rows = [{"sampler": s, "steps": n, "seconds_per_image": n / 1000, "fid_digits_cnn": 100 / n}
            for s in ("ddim", "dpm") for n in (10, 20, 50)]
    path = plot_quality_vs_steps(rows, "fid_digits_cnn", tmp_path / "plots" / "q.png")
    assert matplotlib.image.imread(path).shape[:2] == (400, 1000)


def test_inception_unavailable_offline_says_what_to_do(monkeypatch):
    import torchmetrics.image.fid

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", offline)
    with pytest.raises(GenlabError, match="use eval.extractor=digits_cnn"):
        features.build_extractor("inception", 16, 1)


def test_inception_gets_uint8_rgb(monkeypatch):
    import torchmetrics.image.fid

    class FakeInception(torch.nn.Module):  # stands in for the real weights, which need the network
        def __init__(self, **kwargs):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            return x.float().mean((2, 3)).repeat(1, 683)[:, :2048]

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", FakeInception)
    extractor = features.build_extractor("inception", 16, 1)
    feats, logits = extract(extractor, torch.ones(2, 1, 16, 16))
    assert feats.shape == (2, 2048) and logits is None and feats[0, 0] == 255


def test_eval_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="did you mean eval.n_samples"):
        EvalConfig.from_cfg(OmegaConf.create({"data": {}, "eval": {"n_sample": 10}}))


def test_eval_defaults_come_from_the_yaml_alone():
    """configs/eval/default.yaml is the one place the defaults live: every field is there, and an override wins."""
    settings = EvalConfig.from_cfg(OmegaConf.create({"data": {}, "eval": {"n_samples": 7}}))
    assert settings.n_samples == 7 and settings.reject_fraction == 0.05 and settings.variants is True


class DataFamily:
    """A "generator" that returns data images: perfect, or only one class."""

    def __init__(self, images):
        self.images = images

    def networks(self):
        return {}

    def sample(self, n, seed, **options):
        return self.images[torch.randperm(len(self.images), generator=torch.Generator().manual_seed(seed))[:n]]


@pytest.fixture(scope="module")
def digits_evaluator(trained, cache_dir):
    cfg = OmegaConf.create({"data": {"_target_": "genlab.data.digits.Digits", "image_size": 16, "channels": 1},
                            "eval": {"cache_dir": str(cache_dir), "n_samples": 150, "batch_size": 100}})
    return Evaluator(cfg)


def test_evaluator_on_digits_picks_coverage_and_caches_reference(digits_evaluator, cache_dir):
    assert len(list(cache_dir.glob("ref_digits-*_train_16px_digits_cnn-*_n1617.pt"))) == 1
    data = Digits("val", 16, 1)
    good = digits_evaluator.evaluate(DataFamily(data.images))
    bad = digits_evaluator.evaluate(DataFamily(data.images[data.labels == 3]), n_samples=18)
    assert "fid" not in good and good["classes_covered"] == 10 and bad["classes_covered"] <= 3
    assert good["fid_digits_cnn"] < bad["fid_digits_cnn"] and good["class_kl"] < 0.1 < bad["class_kl"]
    assert good["recall_digits_cnn"] > bad["recall_digits_cnn"]


class VariantFamily(DataFamily):
    """Data images; the variant "noisy" adds noise (as a GAN's truncation changes its samples)."""

    eval_variants = {"noisy": {"noise": 0.6}}

    def sample(self, n, seed, noise=0.0):
        images = super().sample(n, seed)
        return (images + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def test_evaluator_scores_with_both_classifiers_and_each_variant(digits_evaluator):
    metrics = digits_evaluator.evaluate(VariantFamily(Digits("val", 16, 1).images))
    for c in features.CLASSIFIERS:
        assert metrics[f"class_confidence_{c}"] > 0.9 and metrics[f"classes_covered_{c}"] == 10
        assert metrics[f"rejected_{c}"] < 0.1 and f"fid_{c}" in metrics and f"recall_{c}" in metrics
    assert metrics["class_agreement"] > 0.95 and metrics["border_artifacts"] < 0.05
    # The unsuffixed class metrics are the worse classifier's.
    assert metrics["class_confidence"] == min(metrics[f"class_confidence_{c}"] for c in features.CLASSIFIERS)
    assert metrics["class_kl"] == max(metrics[f"class_kl_{c}"] for c in features.CLASSIFIERS)
    assert metrics["class_confidence@noisy"] < metrics["class_confidence"] - 0.1
    assert metrics["rejected_digits_mlp@noisy"] > metrics["rejected_digits_mlp"] + 0.2


def test_class_metrics_follow_the_classifier_that_is_not_fooled(digits_evaluator):
    confident = torch.eye(10).repeat(10, 1) * 20  # sure of a class, the classes spread evenly
    unsure = torch.zeros(100, 10)  # no opinion at all
    metrics = digits_evaluator.class_metrics({"digits_cnn": confident, "digits_mlp": unsure})
    assert metrics["class_confidence_digits_cnn"] == pytest.approx(1.0) and metrics["class_kl_digits_cnn"] < 0.01
    assert metrics["class_confidence_digits_mlp"] == pytest.approx(0.1)
    assert metrics["class_confidence"] == pytest.approx(0.1) and metrics["rejected_digits_mlp"] == 1.0
    assert metrics["class_agreement"] == pytest.approx(0.1)  # argmax of all-equal logits is class 0


class StepsFamily(DataFamily):
    """Data images plus noise that shrinks with the sampler's step count."""

    def sample(self, n, seed, sampler, steps):
        noise = (0.5 if sampler == "ddim" else 0.3) * 10 / steps
        images = super().sample(n, seed)
        return (images + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def test_compare_samplers_rows_and_plot(digits_evaluator, tmp_path):
    family = StepsFamily(Digits("val", 16, 1).images)
    rows = digits_evaluator.compare_samplers(family, [("ddim", 10), ("ddim", 50), ("dpm", 10)], n_samples=100)
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 10), ("ddim", 50), ("dpm", 10)]
    assert rows[0]["fid_digits_cnn"] > rows[2]["fid_digits_cnn"] > rows[1]["fid_digits_cnn"]
    assert all(r["seconds_per_image"] > 0 for r in rows)
    assert plot_quality_vs_steps(rows, "fid_digits_cnn", tmp_path / "q.png").stat().st_size > 10_000


class CircleFamily:
    """A ControlNet stand-in: reads the circle off the sketch (or ignores it) and the colours off the prompt."""

    conditions = ("sketch", "prompt")

    def __init__(self, follow_sketch):
        self.follow_sketch = follow_sketch

    def networks(self):
        return {}

    def sample(self, n, seed, sketch, prompt):
        out = []
        for sk, caption in zip(sketch, prompt):
            fill, background = caption.split()[1], caption.split()[-2]
            ys, xs = np.nonzero(sk[0].numpy() > 0.5)
            cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
            r = np.hypot(xs + 0.5 - cx, ys + 0.5 - cy).mean()
            size = sk.shape[-1]
            out.append(_render(size, cx, cy, r, fill, background) if self.follow_sketch
                       else _render(size, size / 2, size / 2, size / 4, fill, background))
        return torch.stack(out)


def test_evaluator_on_fill_circles_measures_control(cache_dir, monkeypatch):
    import torchmetrics.image.fid

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", offline)
    cfg = OmegaConf.create({"data": {"_target_": "genlab.data.fill_circles.FillCircles", "image_size": 16,
                                     "channels": 3, "count": 200, "val_count": 64},
                            "eval": {"cache_dir": str(cache_dir), "n_samples": 64}})
    evaluator = Evaluator(cfg)  # extractor "auto": Inception is unavailable, so digits_cnn
    assert evaluator.extractor_name == "digits_cnn"
    with_control = evaluator.evaluate(CircleFamily(follow_sketch=True))
    without = evaluator.evaluate(CircleFamily(follow_sketch=False))
    assert with_control["disc_iou"] > 0.85 and without["disc_iou"] < 0.5
    assert with_control["colour_accuracy"] == without["colour_accuracy"] == 1.0
    assert with_control["edge_f1"] > without["edge_f1"] + 0.3
    assert "classes_covered" not in with_control and "fid_digits_cnn" in with_control


def test_eval_table_puts_variants_beside_the_default():
    from genlab.eval.command import metrics_table

    table = metrics_table({"recall": 0.8, "recall@truncation_1": 0.3, "eval_samples": 100.0}, "t")
    assert [c.header for c in table.columns] == ["metric", "value", "truncation_1"]
    assert list(table.columns[0].cells) == ["recall", "eval_samples"]  # one row per metric
    assert list(table.columns[2].cells) == ["0.3", ""]
