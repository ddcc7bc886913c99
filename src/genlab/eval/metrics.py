"""Distribution metrics on extracted features: FID, KID, precision/recall, class coverage, artifact checks.

Features are extracted once per image set (`extract`) and every metric reads them, so
FID, KID and precision/recall cost one pass of the extractor. FID and KID are
torchmetrics' own code, fed the precomputed features (FID through an identity
"extractor", KID through its kernel functions). Results are named by the extractor (`fid_digits_cnn`, `fid_inception`):
a FID on anything but Inception is not comparable with published FIDs, so it is never
called plain "fid".
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import poly_kernel


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor,
            batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (and class logits, if the extractor has a head) of genlab images.

    Args:
        extractor: a module from `genlab.eval.features` (input (N, C, H, W) in [0, 1]).
        images: (N, C, H, W) in [-1, 1], on any device; batches move to the extractor's.

    Returns:
        (features (N, D), logits (N, K) or None), float32 on the CPU.
    """
    device = next(extractor.parameters()).device
    feats, logits = [], []
    for x in images.split(batch_size):
        x = ((x.to(device).float() + 1) / 2).clamp(0, 1)
        if hasattr(extractor, "features_and_logits"):
            f, lg = extractor.features_and_logits(x)
            logits.append(lg.float().cpu())
        else:
            f = extractor(x)
        feats.append(f.float().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


class _Precomputed(nn.Module):
    """Identity "extractor": lets torchmetrics' FID/KID run on features computed once."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (N, D) and (M, D), by torchmetrics."""
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), normalize=True)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subset_size: int = 1000, subsets: int = 50,
                    seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over random subsets) between two feature sets.

    torchmetrics' `KernelInceptionDistance` recomputes the polynomial kernel for every
    subset (50 x 3 products of 1000 x 1000 x D). Here its `poly_kernel` runs once on the
    whole sets and each subset's unbiased MMD^2 (its `maximum_mean_discrepancy`) comes
    from sums over the subset, written as products with 0/1 subset indicators: the same
    numbers for the same subsets (tests check this), at a fraction of the cost.
    `subset_size` is capped at the smaller set's size; subsets are drawn from `seed`.

    Returns:
        (mean, std) of MMD^2 over the subsets; near 0 (either sign) for one distribution.
    """
    m = min(subset_size, len(real), len(fake))
    real, fake = real.double(), fake.double()
    generator = torch.Generator().manual_seed(seed)
    pick_r, pick_f = real.new_zeros(subsets, len(real)), fake.new_zeros(subsets, len(fake))  # 0/1 subset indicators
    for i in range(subsets):  # the draw order of torchmetrics: real subset, then fake subset
        pick_r[i, torch.randperm(len(real), generator=generator)[:m]] = 1
        pick_f[i, torch.randperm(len(fake), generator=generator)[:m]] = 1

    def pair_sum(pick_a, kernel, pick_b):  # (subsets,): sum of kernel over subset pairs
        return ((pick_a @ kernel) * pick_b).sum(1)

    k_rr, k_ff, k_rf = poly_kernel(real, real), poly_kernel(fake, fake), poly_kernel(real, fake)
    within = (pair_sum(pick_r, k_rr, pick_r) - pick_r @ k_rr.diagonal()
              + pair_sum(pick_f, k_ff, pick_f) - pick_f @ k_ff.diagonal()) / (m * (m - 1))
    scores = within - 2 * pair_sum(pick_r, k_rf, pick_f) / m**2
    return float(scores.mean()), float(scores.std(unbiased=False))


def _kth_neighbour_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N,) distance from each row of x to its k-th nearest other row."""
    # k + 1: each point is its own nearest neighbour at distance 0.
    return torch.cat([torch.cdist(xb, x).kthvalue(k + 1, dim=1).values for xb in x.split(chunk)])


def _fraction_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of `points` inside at least one ball (centres[j], radii[j])."""
    inside = [(torch.cdist(pb, centres) <= radii[None]).any(1) for pb in points.split(chunk)]
    return torch.cat(inside).float().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) on feature sets.

    Each set's manifold is the union of balls around its points reaching the k-th nearest
    neighbour. Precision: fraction of fake points inside the real manifold (are samples
    realistic?). Recall: fraction of real points inside the fake manifold (is the data's
    variety covered?).

    Returns:
        (precision, recall), each in [0, 1].
    """
    real, fake = real.double(), fake.double()  # distances to self must come out exactly 0
    precision = _fraction_inside(fake, real, _kth_neighbour_radius(real, k, chunk), chunk)
    recall = _fraction_inside(real, fake, _kth_neighbour_radius(fake, k, chunk), chunk)
    return precision, recall


def feature_metrics(real: torch.Tensor, fake: torch.Tensor, extractor_name: str, k: int = 3,
                    kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """FID, KID (+ std), precision and recall, named after the extractor.

    Returns:
        {"fid_<name>", "kid_<name>", "kid_std_<name>", "precision_<name>", "recall_<name>"}.
    """
    kid, kid_std = kernel_distance(real, fake, kid_subset_size, seed=seed)
    precision, recall = precision_recall(real, fake, k)
    return {f"fid_{extractor_name}": frechet_distance(real, fake), f"kid_{extractor_name}": kid,
            f"kid_std_{extractor_name}": kid_std, f"precision_{extractor_name}": precision,
            f"recall_{extractor_name}": recall}


def class_coverage(fake_logits: torch.Tensor, data_labels: torch.Tensor,
                   min_fraction: float = 0.01) -> dict[str, float]:
    """Mode coverage of generated samples, as in Stacked-MNIST, with a classifier.

    Args:
        fake_logits: (N, K) classifier logits of generated images.
        data_labels: (M,) labels of the reference data (its class histogram).
        min_fraction: a class counts as covered when at least this fraction of the
            samples is classified as it (0.01: a tenth of a fair share of 10 classes), so
            that a handful of stray samples does not count as covering a mode.

    Returns:
        classes_covered (of the classes present in the data), classes_total,
        class_kl = KL(generated histogram || data histogram) in nats (0: same mix of
        classes; log 10 = 2.30 when all samples are one of 10 equally common classes),
        class_confidence = mean top softmax probability (low: ambiguous samples).
    """
    num_classes = fake_logits.shape[1]
    probs = fake_logits.float().softmax(1)
    fake_hist = torch.bincount(probs.argmax(1), minlength=num_classes).double() / len(probs)
    data_hist = torch.bincount(data_labels.long(), minlength=num_classes).double() / len(data_labels)
    present = data_hist > 0
    # eps: a class the data lacks (exclude_classes) gives a large but finite KL.
    kl = torch.where(fake_hist > 0, fake_hist * (fake_hist / data_hist.clamp_min(1e-6)).log(), 0.0).sum()
    return {"classes_covered": float(((fake_hist >= min_fraction) & present).sum()),
            "classes_total": float(present.sum()), "class_kl": float(kl),
            "class_confidence": float(probs.max(1).values.mean())}


def class_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Fraction of samples that two classifiers (logits (N, K) each) put in the same class."""
    return (logits_a.argmax(1) == logits_b.argmax(1)).float().mean().item()


def rejection_rate(fake_logits: torch.Tensor, real_logits: torch.Tensor, real_fraction: float = 0.05) -> float:
    """Fraction of samples a classifier rejects as out of distribution (maximum-softmax OOD test).

    The threshold is the top softmax probability that all but `real_fraction` of real
    held-out images reach, so real images are rejected at about that rate: a sample below
    it looks to the classifier like no digit it knows (broken strokes, blobs, noise).

    Args:
        fake_logits: (N, K) logits of generated images.
        real_logits: (M, K) logits of real images the classifier was not trained on.
    """
    threshold = real_logits.float().softmax(1).max(1).values.quantile(real_fraction)
    return (fake_logits.float().softmax(1).max(1).values < threshold).float().mean().item()


def border_energy(images: torch.Tensor, width: int = 2) -> torch.Tensor:
    """(N, 4) mean brightness in [0, 1] of each image's top, bottom, left and right strips `width` pixels wide.

    Args:
        images: (N, C, H, W) in [-1, 1]; channels are averaged.
    """
    x = (images.float().mean(1) + 1) / 2  # (N, H, W)
    strips = (x[:, :width], x[:, -width:], x[:, :, :width], x[:, :, -width:])
    return torch.stack([s.flatten(1).mean(1) for s in strips], 1)


def border_artifact_rate(fake: torch.Tensor, real_border: torch.Tensor, quantile: float = 0.995,
                         width: int = 2) -> float:
    """Fraction of samples with a border strip brighter than almost any real image has there.

    Per side (top, bottom, left, right), the bound is the `quantile` of the real images'
    strip brightness; a sample is flagged when any side exceeds its bound. Catches the
    bright blocks a generator can leave at the image edges; real images score at most
    about 4 x (1 - quantile).

    Args:
        fake: (N, C, H, W) in [-1, 1].
        real_border: (M, 4) `border_energy(real_images, width)`.
    """
    bound = real_border.float().quantile(quantile, dim=0)  # (4,)
    return (border_energy(fake, width) > bound).any(1).float().mean().item()


def reference_key(dataset: str, split: str, image_size: int, extractor_tag: str, n: int) -> str:
    """File name of cached reference features: readable, one per (data, split, size, extractor, count)."""
    return f"ref_{dataset}_{split}_{image_size}px_{extractor_tag}_n{n}.pt"


def dataset_fingerprint(name: str, data_cfg: dict) -> str:
    """`name` plus a short hash of the data config, so a changed config never reuses stale statistics."""
    digest = hashlib.sha1(json.dumps(data_cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def cached_reference(path: Path, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Reference statistics from `path`, or `compute()` them and save them there.

    Args:
        path: a file named by `reference_key` under the cache directory.
        compute: returns {"features": (N, D), optionally "logits", "labels"}.
    """
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    ref = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # atomic for concurrent runs sharing a cache
    torch.save(ref, tmp)
    os.replace(tmp, path)
    return ref
