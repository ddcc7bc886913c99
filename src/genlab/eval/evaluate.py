"""The entry point of `genlab eval RUN_DIR` and `trainer.eval_every`.

`Evaluator(cfg)` builds what is expensive once (datasets, feature extractor, reference
features, all cached on disk); `evaluate(family)` samples and returns a flat
{name: float} of every metric the run supports, picked by what the data and the family
provide, never by the family's name:

- always: FID / KID / precision / recall on the extractor's features (`fid_digits_cnn`), and
  the border-artifact rate (bright strips at the image edges, against the data's own);
- labelled data (items declare "label"): class coverage, class KL, confidence and
  out-of-distribution rejections by each of two independently trained classifiers of
  different kinds (`features.KINDS`: a CNN and an 8x8 MLP, trained on the data's own train
  split: `digits_cnn`, `digits_mlp` on the digits), each also as a feature extractor, plus
  how often the two agree; the unsuffixed class metrics are the worse of the two, so no
  target rests on one network;
- an `EvalVariants` family ({name: sample options}, e.g. a GAN's truncation): the sample
  metrics again for each, as `<metric>@<name>`;
- a `Conditioned` family (e.g. conditions ("sketch", "prompt")): images are generated from
  val items, and compared with them: disc IoU and caption-colour accuracy (fill_circles),
  edge F1 (any sketch data);
- an `Autoencoder` family (a VAE): reconstruction error, ELBO, IWAE bound on val, and
  anomaly AUROC when `data.exclude_classes` is set.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from genlab.config import config_dir
from genlab.data import collate_items
from genlab.errors import ConfigError, GenlabError
from genlab.eval.control_metrics import control_metrics
from genlab.eval.features import KINDS, LabelledSet, build_extractor, default_cache_dir, load_or_train_classifier
from genlab.eval.metrics import (border_artifact_rate, border_energy, cached_reference, class_agreement,
                                 class_coverage, dataset_fingerprint, extract, feature_metrics, reference_key,
                                 rejection_rate)
from genlab.eval.vae_metrics import anomaly_auroc, vae_scores
from genlab.families.contract import Autoencoder, Conditioned, Decode, Diffused, Encode, EvalVariants

log = logging.getLogger(__name__)

#: Family sample() option -> dataset item key it is filled from.
CONDITION_ITEMS = {"sketch": "sketch", "prompt": "caption"}
#: Labelled items the classifiers train on, at most (seconds on a CPU).
MAX_CLASSIFIER_ITEMS = 20_000


@dataclass
class EvalConfig:
    """The `eval:` config group. Its defaults and their meaning live in one place: configs/eval/default.yaml."""

    extractor: str
    n_samples: int
    n_reference: int
    batch_size: int
    cache_dir: str | None
    inception_weights: str | None
    pr_k: int
    kid_subset_size: int
    coverage_min_fraction: float
    iwae_k: int
    vae_likelihood: str
    vae_decoder_scale: float | None
    edge_tolerance: int
    reject_fraction: float
    border_quantile: float
    variants: bool
    seed: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig | dict | None) -> "EvalConfig":
        """From a run config's `eval` group (or that group itself); unknown keys are a ConfigError."""
        group = cfg.get("eval") if isinstance(cfg, DictConfig) and "data" in cfg else cfg
        values = OmegaConf.to_container(group, resolve=True) if isinstance(group, DictConfig) else dict(group or {})
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean eval.{close[0]}?" if close else "."
                raise ConfigError(f"eval.{key} is not a key of eval{hint}")
        defaults = OmegaConf.to_container(OmegaConf.load(config_dir() / "eval" / "default.yaml"))
        return cls(**{**defaults, **values})


def _subset(n: int, k: int) -> list[int]:
    """k of range(n), a fixed random choice (sorted data, e.g. by writer, must not bias it)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].tolist()


@contextlib.contextmanager
def _eval_mode(family: Any):
    """Networks in eval mode (dropout off) while evaluating, restored afterwards."""
    nets = list(family.networks().values())
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    try:
        yield
    finally:
        for net, mode in zip(nets, modes):
            net.train(mode)


class Evaluator:
    """Metrics for one run's data, reusable across evaluations (e.g. every `eval_every` steps).

    Args:
        cfg: the run's config; reads `data` (to build the datasets and key the cache)
            and the optional `eval` group (`EvalConfig`).
        device: where the extractor runs (the family samples on its own device).
        datasets: (train, val) to use instead of `build_dataset(cfg.data, split)`.
    """

    def __init__(self, cfg: DictConfig, device: str | torch.device = "cpu", datasets: tuple[Any, Any] | None = None):
        from genlab.data import LOADER_KEYS, ColourCaptions, build_dataset

        self.cfg, self.settings, self.device = cfg, EvalConfig.from_cfg(cfg), torch.device(device)
        self.train, self.val = datasets or (build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val"))
        self.palette = self.val.palette if isinstance(self.val, ColourCaptions) else None
        self.cache_dir = Path(self.settings.cache_dir or default_cache_dir())
        _, self.channels, self.image_size, _ = collate_items(self.train, [0])["image"].shape
        data_cfg = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in LOADER_KEYS}
        self.dataset_name = type(self.train).__name__.lower()
        self.dataset_key = dataset_fingerprint(self.dataset_name, data_cfg)
        # A dataset whose items declare labels gets class metrics: two classifiers of different kinds,
        # trained on its own train split (cached), score the samples.
        self.classifiers = self._classifiers() if "label" in getattr(self.train, "item_keys", ()) else {}
        self.extractor = self._build_extractor().to(self.device)
        # Every extractor whose features are measured: the chosen one and every classifier.
        self.extractors = {self.extractor.name: self.extractor, **self.classifiers}
        self.references = {name: self._reference(extractor) for name, extractor in self.extractors.items()}
        self.reference = self.references[self.extractor.name]
        self.border_reference = self._border_reference()
        self.val_logits = self._val_logits()

    def _classifiers(self) -> dict[str, torch.nn.Module]:
        """{name: classifier} of each kind (`features.KINDS`), trained on the train split (at most
        MAX_CLASSIFIER_ITEMS items, in the data's order) and checked on val; cached by the data's fingerprint."""
        n = min(len(self.train), MAX_CLASSIFIER_ITEMS)
        train = collate_items(self.train, list(range(n)) if n == len(self.train) else _subset(len(self.train), n))
        val = collate_items(self.val, list(range(len(self.val))))
        labels = torch.as_tensor(train["label"]).long()
        data = LabelledSet(self.dataset_name, f"-{self.dataset_key.rsplit('-', 1)[-1]}", train["image"], labels,
                           val["image"], torch.as_tensor(val["label"]).long(),
                           int(self.cfg.data.get("num_classes") or labels.max() + 1))
        models = {}
        for kind in KINDS:
            model = load_or_train_classifier(kind, self.image_size, self.channels, self.cache_dir, data)
            models[model.name] = model.to(self.device)
        return models

    def _build_extractor(self) -> torch.nn.Module:
        name = self.settings.extractor

        def build(name: str) -> torch.nn.Module:
            return build_extractor(name, self.image_size, self.channels, self.cache_dir, self.settings.inception_weights)

        if name in self.classifiers:
            return self.classifiers[name]
        if name != "auto":
            return build(name)
        if self.classifiers:  # a classifier trained on this very data
            return next(iter(self.classifiers.values()))
        try:
            return build("inception")
        except GenlabError as err:
            log.warning("%s; using digits_cnn features instead (metrics named *_digits_cnn)", err)
            return build("digits_cnn")

    @property
    def extractor_name(self) -> str:
        return self.extractor.name

    def _reference(self, extractor: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Features (and labels) of up to n_reference train images, cached on disk."""
        n = min(len(self.train), self.settings.n_reference)
        key = reference_key(self.dataset_key, "train", self.image_size, extractor.cache_tag, n)

        def compute() -> dict[str, torch.Tensor]:
            items = collate_items(self.train, _subset(len(self.train), n))
            ref = {"features": extract(extractor, items["image"], self.settings.batch_size)[0]}
            if "label" in items:
                ref["labels"] = torch.as_tensor(items["label"]).cpu()
            return ref

        return cached_reference(self.cache_dir / key, compute)

    def _border_reference(self) -> torch.Tensor:
        """(N, 4) border strip brightness of up to n_reference train images (`border_energy`), cached."""
        n = min(len(self.train), self.settings.n_reference)
        key = reference_key(self.dataset_key, "train", self.image_size, "border", n)

        def compute() -> dict[str, torch.Tensor]:
            return {"border": border_energy(collate_items(self.train, _subset(len(self.train), n))["image"])}

        return cached_reference(self.cache_dir / key, compute)["border"]

    def _val_logits(self) -> dict[str, torch.Tensor]:
        """Each classifier's logits on the val images, which none was trained on: the OOD test's yardstick."""
        if not self.classifiers:
            return {}
        images = collate_items(self.val, list(range(len(self.val))))["image"]
        return {name: extract(model, images, self.settings.batch_size)[1] for name, model in self.classifiers.items()}

    @torch.no_grad()
    def generate(self, family: Any, n: int, seed: int, options: dict | None = None, items: dict | None = None,
                 conditions: tuple[str, ...] = ()) -> torch.Tensor:
        """(n, C, H, W) samples on the CPU, in batches; batch b gets seed + b * batch_size.

        `items` (batched dataset items, n long) fill the sample options named in
        `conditions`: "sketch" gets (B, C, H, W) sketches, "prompt" a list of B captions.
        """
        out, bs = [], self.settings.batch_size
        for start in range(0, n, bs):
            opts = dict(options or {})
            for option in conditions:
                opts[option] = items[CONDITION_ITEMS[option]][start:start + bs]
            out.append(family.sample(min(bs, n - start), seed + start, **opts).float().cpu())
        return torch.cat(out)

    def sample_metrics(self, images: torch.Tensor) -> dict[str, float]:
        """Feature metrics, border artifacts and (on digits) class metrics of images (N, C, H, W) in [-1, 1]."""
        s = self.settings
        metrics, logits = {}, {}
        for name, extractor in self.extractors.items():
            feats, logits[name] = extract(extractor, images, s.batch_size)
            metrics.update(feature_metrics(self.references[name]["features"], feats, name, s.pr_k,
                                           s.kid_subset_size, s.seed))
        metrics["border_artifacts"] = border_artifact_rate(images, self.border_reference, s.border_quantile)
        metrics.update(self.class_metrics({name: logits[name] for name in self.classifiers}))
        return metrics

    def class_metrics(self, logits: dict[str, torch.Tensor]) -> dict[str, float]:
        """Class metrics per classifier (`<metric>_<classifier>`), their worst case and agreement.

        Args:
            logits: {classifier name: (N, K) logits of the samples}, one per `self.classifiers`.

        Returns:
            classes_covered_<c>, class_kl_<c>, class_confidence_<c>, rejected_<c> for each
            classifier c; classes_covered / class_kl / class_confidence = the worse of them
            (a sample set meets a class target only if every classifier agrees it does);
            class_agreement = fraction of samples all classifiers put in the same class.
        """
        if not logits or "labels" not in self.reference:
            return {}
        s, metrics = self.settings, {}
        for name, lg in logits.items():
            per = class_coverage(lg, self.reference["labels"], s.coverage_min_fraction)
            per["rejected"] = rejection_rate(lg, self.val_logits[name], s.reject_fraction)
            metrics.update({f"{k}_{name}": v for k, v in per.items() if k != "classes_total"})
            metrics["classes_total"] = per["classes_total"]
        names = list(logits)
        metrics["classes_covered"] = min(metrics[f"classes_covered_{n}"] for n in names)
        metrics["class_kl"] = max(metrics[f"class_kl_{n}"] for n in names)
        metrics["class_confidence"] = min(metrics[f"class_confidence_{n}"] for n in names)
        first = logits[names[0]]
        metrics["class_agreement"] = min((class_agreement(first, logits[n]) for n in names[1:]), default=1.0)
        return metrics

    def vae_metrics(self, encode: Encode, decode: Decode, likelihood: str,
                    conditional: bool = False) -> dict[str, float]:
        """recon_mse, elbo, nll_iwae (means over normal val images) and anomaly_auroc.

        With `data.exclude_classes`, val images of those classes (never seen in training)
        are the anomalies: scored by their IWAE NLL, they give `anomaly_auroc`, and the
        other metrics average over the remaining, normal, images only. A `conditional`
        VAE gets each image's true label.
        """
        s = self.settings
        items = collate_items(self.val, _subset(len(self.val), min(len(self.val), s.n_reference)))
        labels = torch.as_tensor(items["label"]).cpu() if "label" in items else None
        scores = vae_scores(encode, decode, items["image"].to(self.device), s.iwae_k, likelihood,
                            s.vae_decoder_scale, s.batch_size, s.seed, labels if conditional else None)
        metrics, normal = {}, torch.ones(len(items["image"]), dtype=torch.bool)
        excluded = list(self.cfg.data.get("exclude_classes") or [])
        if excluded and labels is not None:
            anomaly = torch.isin(labels, torch.tensor(excluded))
            if anomaly.any():
                metrics["anomaly_auroc"] = anomaly_auroc(scores["nll_iwae"], anomaly)
                normal = ~anomaly
        metrics.update({name: float(v[normal].mean()) for name, v in scores.items()})
        metrics["iwae_k"] = float(s.iwae_k)
        return metrics

    def evaluate(self, family: Any, n_samples: int | None = None, seed: int | None = None,
                 **sample_options: Any) -> dict[str, float]:
        """Every metric this run supports, as {name: float}.

        Args:
            family: a `genlab.families.contract.Family`. An optional attribute `conditions`
                (tuple of sample() options among "sketch", "prompt") makes it generate
                from val items instead of unconditionally; an optional `eval_variants`
                ({name: sample options}) adds the sample metrics under those options.
            n_samples, seed: default to eval.n_samples / eval.seed.
            sample_options: passed to every `family.sample` (e.g. sampler="ddim", steps=20).
        """
        n = n_samples or self.settings.n_samples
        if n <= self.settings.pr_k:
            raise ConfigError(f"--n {n}: the metrics need more than eval.pr_k={self.settings.pr_k} generated images "
                              "(a few hundred give numbers worth comparing).")
        seed = self.settings.seed if seed is None else seed
        conditions = tuple(family.conditions) if isinstance(family, Conditioned) else ()
        items = collate_items(self.val, [i % len(self.val) for i in range(n)]) if conditions else None
        with _eval_mode(family):
            images = self.generate(family, n, seed, sample_options, items, conditions)
            metrics = self.sample_metrics(images)
            variants = family.eval_variants if isinstance(family, EvalVariants) and self.settings.variants else {}
            for variant, options in variants.items():  # e.g. a GAN with and without truncation
                varied = self.generate(family, n, seed, {**sample_options, **options}, items, conditions)
                metrics.update({f"{k}@{variant}": v for k, v in self.sample_metrics(varied).items()})
            if items is not None:
                metrics.update(control_metrics(images, items, self.palette, self.settings.edge_tolerance))
            if isinstance(family, Autoencoder):  # a conditional VAE (num_classes set) gets the true labels
                encode, decode, likelihood = family.autoencoder()
                if self.settings.vae_likelihood != "auto":
                    likelihood = self.settings.vae_likelihood
                metrics.update(self.vae_metrics(encode, decode, likelihood, conditional=bool(family.num_classes)))
        metrics["eval_samples"] = float(n)
        return metrics

    def compare_samplers(self, family: Any, samplers: list[tuple[str, int]] | None = None,
                         n_samples: int | None = None, seed: int | None = None) -> list[dict[str, Any]]:
        """Quality and time per image for each (sampler, steps), e.g. for `plots.plot_quality_vs_steps`.

        Args:
            samplers: (sampler, steps) settings; None: those of the family's objective
                (`Diffusion.comparison`: DDPM/DDIM/DPM-Solver++, or Euler/Heun for flow).

        Returns:
            One row per setting: {"sampler", "steps", "seconds_per_image", **sample_metrics}.
        """
        if samplers is None:
            if not isinstance(family, Diffused):
                raise GenlabError("--compare-samplers applies to diffusion models (ddpm, sd, controlnet) only.")
            samplers = family.diffusion.comparison()
        n = n_samples or self.settings.n_samples
        seed = self.settings.seed if seed is None else seed
        rows = []
        with _eval_mode(family):
            for sampler, steps in samplers:
                start = time.perf_counter()
                images = self.generate(family, n, seed, {"sampler": sampler, "steps": steps})  # .cpu() syncs
                seconds = (time.perf_counter() - start) / n
                rows.append({"sampler": sampler, "steps": steps, "seconds_per_image": seconds,
                             **self.sample_metrics(images)})
        return rows

