"""Feature extractors for FID / KID / precision-recall, and the classifier for coverage.

Every extractor is an `nn.Module` that torchmetrics accepts as a custom `feature`:

    images (N, C, H, W) float in [0, 1]  ->  features (N, num_features)

That is torchmetrics' convention for a custom extractor with `normalize=True`, e.g.
`FrechetInceptionDistance(feature=extractor, normalize=True)`. Floats rather than uint8
because generated images are floats: quantizing them first would only add noise.
(genlab images live in [-1, 1]; `metrics.extract` maps them to [0, 1].) uint8 input in
[0, 255] is accepted too.

Three extractors:
- `DigitsCNN` (name "<dataset>_cnn", e.g. "digits_cnn"): a small CNN that genlab trains
  itself, offline, in a few seconds on a labelled dataset's train split (scikit-learn's
  digits by default); its penultimate layer gives features and its head gives class
  logits (class coverage, confidence).
- `DigitsMLP` (name "<dataset>_mlp"): a second classifier of another kind (an MLP on 8x8
  pixels, other augmentation, other seed), so that class metrics never rest on one
  network's blind spots.
- `InceptionFeatures` (name "inception"): the standard 2048-d pool features through
  torchmetrics / torch-fidelity; needs those weights (downloaded on first use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import GenlabError

#: Bump when DigitsCNN's architecture or training changes: cached weights and cached
#: reference statistics are keyed by it, so stale ones are never loaded.
DIGITS_CNN_VERSION = 1
DIGITS_MLP_VERSION = 1
INCEPTION_UNAVAILABLE = ("Inception weights are not available offline; use eval.extractor=digits_cnn "
                         "or install torch-fidelity with network access")


def default_cache_dir() -> Path:
    """Where extractor weights and reference statistics are cached (genlab.config.cache_root())."""
    from genlab.config import cache_root

    return cache_root()


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] -> float [0, 1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


class _DigitsClassifier(nn.Module):
    """What both digits classifiers share: `_embed` (set by each) -> scaled features, and a linear head."""

    kind: str  # "cnn" or "mlp": names the classifier `<data>_<kind>`

    def __init__(self, body: nn.Module, image_size: int, channels: int, num_features: int, num_classes: int,
                 data: str, data_tag: str):
        super().__init__()
        self.image_size, self.channels, self.num_features = image_size, channels, num_features
        self.name, self.data_tag = f"{data}_{self.kind}", data_tag
        self.body = body  # built by the subclass before the head: the seeded initialisation keeps its order
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(num_features, num_classes)
        # Fixed after training so that features have mean squared norm num_features on the
        # train data: KID's polynomial kernel (x.y / D + 1)^3 then sees values near 1, as
        # with Inception features, instead of hundreds (raw ReLU features are large).
        self.register_buffer("feature_scale", torch.tensor(1.0))
        self.val_accuracy: float | None = None  # set by training or loading

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> penultimate features (N, num_features), scaled."""
        return self._embed(images) * self.feature_scale

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> class logits (N, 10)."""
        return self.head(self._embed(images))

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) at the cost of one forward pass."""
        feats = self._embed(images)
        return feats * self.feature_scale, self.head(feats)


class DigitsCNN(_DigitsClassifier):
    """A small digit classifier whose penultimate layer serves as a feature extractor.

    Args:
        image_size: side of the images it scores (and was trained on); inputs are resized to
            `work_size` = min(image_size, 16) first: digits carry 8x8 pixels of detail, and
            16 px keeps it at a quarter of the cost of 32 px.
        channels: 1 (grey) or 3 (grey repeated), as in `genlab.data.digits.Digits`.
        num_features: width of the penultimate layer (the FID/KID feature dimension).
    """

    kind = "cnn"

    def __init__(self, image_size: int = 16, channels: int = 1, num_features: int = 128, num_classes: int = 10,
                 data: str = "digits", data_tag: str = ""):
        body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (32, 8, 8) at 16 px
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # (64, 4, 4) whatever the work size
            nn.Flatten(), nn.Linear(64 * 16, num_features), nn.ReLU(),
        )
        super().__init__(body, image_size, channels, num_features, num_classes, data, data_tag)
        self.work_size = min(image_size, 16)

    @property
    def cache_tag(self) -> str:
        """Identifies these weights in cache keys (architecture version, size, channels)."""
        return f"{self.name}-v{DIGITS_CNN_VERSION}{self.data_tag}-{self.image_size}px-{self.channels}ch"

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        x = _as_unit_float(images) * 2 - 1  # the network was trained on [-1, 1] like genlab data
        if x.shape[1] != self.channels:  # grey <-> RGB, so any digits-like image can be scored
            x = x.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        if x.shape[-1] != self.work_size or x.shape[-2] != self.work_size:
            x = F.interpolate(x, size=(self.work_size, self.work_size), mode="bilinear", antialias=True)
        return self.body(x)


class DigitsMLP(_DigitsClassifier):
    """A second digit classifier, built unlike `DigitsCNN` so that the two rarely share a blind spot.

    It reads the digits at their native 8x8 (inputs are area-averaged down to 8 px, grey) as
    one vector: every pixel has weights of its own, so it notices *where* things are (a bright
    block at the border, a stroke where no digit has one), which the CNN's pooling forgives.
    It is trained with other augmentation (small rotations and scalings instead of shifts)
    and another seed. Same interface as `DigitsCNN`.

    Args:
        image_size, channels: of the images it scores (any channel count is read as grey).
        num_features: width of the penultimate layer (the FID/KID feature dimension).
    """

    kind = "mlp"

    def __init__(self, image_size: int = 16, channels: int = 1, num_features: int = 128, num_classes: int = 10,
                 data: str = "digits", data_tag: str = ""):
        body = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8, 256), nn.ReLU(), nn.Linear(256, num_features), nn.ReLU())
        super().__init__(body, image_size, channels, num_features, num_classes, data, data_tag)
        self.work_size = 8

    @property
    def cache_tag(self) -> str:
        return f"{self.name}-v{DIGITS_MLP_VERSION}{self.data_tag}-{self.image_size}px-{self.channels}ch"

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        x = _as_unit_float(images).mean(1, keepdim=True) * 2 - 1  # grey, [-1, 1]
        if x.shape[-1] != self.work_size or x.shape[-2] != self.work_size:
            x = F.interpolate(x, size=(self.work_size, self.work_size), mode="area")
        return self.body(x)


DigitsClassifier = DigitsCNN | DigitsMLP
#: The two kinds of classifier `genlab eval` trains on a labelled dataset's train split and scores
#: samples with (named `<dataset>_cnn`, `<dataset>_mlp`); a class target is met only if both meet it.
KINDS = {"cnn": DigitsCNN, "mlp": DigitsMLP}
#: Their names on the bundled digits.
CLASSIFIERS = ("digits_cnn", "digits_mlp")


@dataclass
class LabelledSet:
    """A labelled dataset's images, as classifiers are trained on it and checked.

    Args:
        name: the dataset's name, which names the classifiers (`digits` -> `digits_cnn`).
        tag: identifies the data in cache keys ("" for the bundled digits' default split).
        train_images, train_labels, val_images, val_labels: (N, C, H, W) in [-1, 1] and (N,) long.
        num_classes: the label count.
    """

    name: str
    tag: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int


def digits_set(image_size: int, channels: int) -> LabelledSet:
    """scikit-learn's digits at `image_size` (the default split genlab trains on)."""
    from genlab.data.digits import Digits  # the data package imports hydra; keep it off the import path

    train, val = Digits("train", image_size, channels), Digits("val", image_size, channels)
    return LabelledSet("digits", "", train.images, train.labels, val.images, val.labels, 10)


def _shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (one shift per batch), padding with background (-1)."""
    if max_shift == 0:
        return images
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    h, w = images.shape[-2:]
    return padded[..., max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]


def _rotate_and_scale(images: torch.Tensor, generator: torch.Generator, max_angle: float = 0.2,
                      max_scale: float = 0.1) -> torch.Tensor:
    """Per image, a random rotation (+-max_angle radians) and scaling (1 +- max_scale), background-filled."""
    b = len(images)
    angle = (torch.rand(b, generator=generator) * 2 - 1) * max_angle
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * max_scale
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Sampled in [0, 1], where grid_sample's zero padding is the black background (not grey, as 0 is in [-1, 1]).
    return F.grid_sample((images + 1) / 2, grid, align_corners=False) * 2 - 1


def _cnn_augment(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    x = _shift(images, max_shift, generator)
    return x + 0.05 * torch.randn(x.shape, generator=generator)


def _mlp_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    x = _rotate_and_scale(images, generator)
    return x + 0.05 * torch.randn(x.shape, generator=generator)


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of `model` on genlab images (N, C, H, W) in [-1, 1]."""
    model.eval()
    preds = torch.cat([model.logits((x + 1) / 2).argmax(1) for x in images.split(512)])
    return (preds == labels).float().mean().item()


def train_digits_cnn(image_size: int, channels: int, epochs: int = 12, seed: int = 0,
                     data: LabelledSet | None = None) -> DigitsCNN:
    """Train a `DigitsCNN` on the digits train split and measure it on the val split.

    Uses exactly the images genlab trains on (`genlab.data.digits.Digits`, default split,
    no excluded classes), so the val accuracy is on digits the classifier never saw. Mild
    shift and noise augmentation keeps it steady on generated, slightly imperfect digits.

    Returns:
        The model in eval mode, with `val_accuracy` set.
    """
    max_shift = max(image_size // 8, 1)  # one source (8 px) pixel
    return _train(DigitsCNN, image_size, channels, epochs, seed, lambda x, g: _cnn_augment(x, g, max_shift), data)


def train_digits_mlp(image_size: int, channels: int, epochs: int = 40, seed: int = 1,
                     data: LabelledSet | None = None) -> DigitsMLP:
    """Train a `DigitsMLP` like `train_digits_cnn` (same split), with rotation/scaling augmentation and another seed."""
    return _train(DigitsMLP, image_size, channels, epochs, seed, _mlp_augment, data)


def _train(model_class: type, image_size: int, channels: int, epochs: int, seed: int, augment,
           data: LabelledSet | None = None) -> DigitsClassifier:
    """Train on `data`'s train split (default: the digits), with at least ~2,000 steps' worth of epochs on small sets."""
    data = data or digits_set(image_size, channels)
    # Small labelled sets get more epochs, so that every set sees about as many batches as the digits do.
    epochs = max(epochs, round(epochs * 1617 / max(1, len(data.train_images))))
    threads = torch.get_num_threads()
    # One thread: these nets are too small to gain from more, and on a busy 2-core CPU two
    # threads spun on each other and made training ~7x slower.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # fixed weights and dropout, caller's RNG untouched
            torch.manual_seed(seed)
            model = model_class(image_size, channels, num_classes=data.num_classes, data=data.name, data_tag=data.tag)
            _fit(model, data.train_images, data.train_labels, epochs, torch.Generator().manual_seed(seed), augment)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model._embed((x + 1) / 2) for x in data.train_images.split(512)])
        model.feature_scale.fill_((model.num_features / feats.pow(2).sum(1).mean()).sqrt())
    model.val_accuracy = accuracy(model, data.val_images, data.val_labels)
    return model


def _fit(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, epochs: int,
         generator: torch.Generator, augment):
    """Adam + one-cycle schedule, batch 64, each batch through `augment(images, generator)`."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * ((len(images) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=generator).split(64):
            x = augment(images[idx], generator)
            feats = model._embed(((x + 1) / 2).clamp(0, 1))
            loss = F.cross_entropy(model.head(model.dropout(feats)), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


def load_or_train_digits_classifier(name: str, image_size: int, channels: int = 1,
                                    cache_dir: str | Path | None = None) -> DigitsClassifier:
    """The digits classifier `name` ("digits_cnn" or "digits_mlp") for this image size, trained at most once.

    Args:
        name: one of `CLASSIFIERS`.
        image_size: side of the images it will score.
        channels: 1 or 3.
        cache_dir: where the weights are cached (default: `default_cache_dir()`).

    Returns:
        The model in eval mode with `val_accuracy` set, loaded from
        `cache_dir/<name>-v{version}-{size}px-{channels}ch.pt` when that exists,
        trained (seconds on CPU) and saved there otherwise.
    """
    return load_or_train_classifier(name.removeprefix("digits_"), image_size, channels, cache_dir)


def load_or_train_classifier(kind: str, image_size: int, channels: int, cache_dir: str | Path | None = None,
                             data: LabelledSet | None = None) -> DigitsClassifier:
    """The classifier of `kind` ("cnn" or "mlp") trained on `data` (default: the digits), trained at most once.

    Returns:
        The model in eval mode with `val_accuracy` set, loaded from `cache_dir/<cache_tag>.pt`
        when that exists (the tag names the data, its size and the architecture's version),
        trained (seconds on CPU) and saved there otherwise.
    """
    train = {"cnn": train_digits_cnn, "mlp": train_digits_mlp}[kind]  # looked up per call: tests patch them
    num_classes = data.num_classes if data else 10
    model = KINDS[kind](image_size, channels, num_classes=num_classes, data=data.name if data else "digits",
                        data_tag=data.tag if data else "")
    path = Path(cache_dir or default_cache_dir()) / f"{model.cache_tag}.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        model.val_accuracy = float(saved["val_accuracy"])
        return model.eval()
    model = train(image_size, channels, data=data) if data else train(image_size, channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # atomic: a concurrent reader never sees half a file
    torch.save({"state_dict": model.state_dict(), "val_accuracy": model.val_accuracy}, tmp)
    os.replace(tmp, path)
    return model


def load_or_train_digits_cnn(image_size: int, channels: int = 1, cache_dir: str | Path | None = None) -> DigitsCNN:
    """`load_or_train_digits_classifier("digits_cnn", ...)`."""
    return load_or_train_digits_classifier("digits_cnn", image_size, channels, cache_dir)


class InceptionFeatures(nn.Module):
    """torchmetrics' Inception v3 (torch-fidelity weights), 2048-d pool features.

    Args:
        weights_path: a local copy of torch-fidelity's `pt_inception-2015-12-05` weights;
            None downloads them on first use (needs the network once).

    Raises:
        GenlabError: torch-fidelity is not installed or the weights cannot be had.
    """

    name = "inception"
    num_features = 2048
    cache_tag = "inception-2048"

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=weights_path)
        except (ImportError, OSError, RuntimeError) as err:  # no torch-fidelity; no network (URLError is an OSError)
            raise GenlabError(f"{INCEPTION_UNAVAILABLE} ({type(err).__name__}: {err})") from err

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] (or uint8) -> (N, 2048); grey is repeated to RGB."""
        x = images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x).reshape(len(x), -1)


def build_extractor(name: str, image_size: int, channels: int, cache_dir: str | Path | None = None,
                    inception_weights: str | None = None) -> nn.Module:
    """The extractor called `name` ("digits_cnn", "digits_mlp" or "inception"), built on demand.

    Raises:
        GenlabError: an unknown name, or Inception without its weights.
    """
    if name in CLASSIFIERS:
        return load_or_train_digits_classifier(name, image_size, channels, cache_dir)
    if name == "inception":
        return InceptionFeatures(inception_weights)
    raise GenlabError(f"eval.extractor={name!r} is unknown; use digits_cnn, digits_mlp or inception.")
