"""A family and a labelled dataset written from the contracts alone (families/contract.py, data/__init__.py).

`test_contracts.py` trains, samples, resumes and evaluates them through the real CLI, with
their configs in a folder of the test's own (`--config-dir`), as a user's package would.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from genlab.families.contract import Card, batch_labels, single_optimizer
from genlab.step_random import StepRandom


class Stripes(torch.utils.data.Dataset):
    """Class k is a bright horizontal band in the k-th quarter of a dark image, with pixel noise."""

    item_keys = ("image", "label")

    def __init__(self, split: str = "train", image_size: int = 8, channels: int = 1, count: int = 256,
                 num_classes: int = 4):
        self.size, self.channels, self.num_classes = image_size, channels, num_classes
        self.count = count if split == "train" else count // 4
        self.offset = 0 if split == "train" else 10**6  # val items differ from train items

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self.offset + index)
        image = -torch.ones(self.channels, self.size, self.size) + 0.2 * torch.rand(self.channels, self.size, self.size, generator=g)
        band = self.size // self.num_classes
        image[:, label * band:(label + 1) * band] = 0.8
        return {"image": image, "label": label}


class ClassTemplates:
    """The smallest class-conditional generative model: a learned image per class plus Gaussian pixel noise."""

    name = "templates"
    card = Card(what="a learned image per class (templates.safetensors, one row per class)", title="Class templates",
                tags=("templates", "safetensors"),
                use='from safetensors.torch import load_file\n\ntemplates = load_file("{where}/templates.safetensors")')
    losses = ("loss",)
    metrics: dict[str, str] = {}

    def __init__(self, image_size: int, channels: int, num_classes: int, noise: float = 0.1):
        self.ema_network, self.num_classes, self.noise = "net", num_classes, noise
        self.shape = (channels, image_size, image_size)
        self.net = nn.Embedding(num_classes, channels * image_size * image_size)
        nn.init.zeros_(self.net.weight)

    def networks(self):
        return {"net": self.net}

    def param_groups(self):
        return single_optimizer(self.networks())

    def phases(self, step: int):
        return ["main"]

    def to(self, device, dtype=None):
        self.net.to(device)
        return self

    def loss(self, phase: str, batch: dict, step: int, rng: StepRandom):
        labels = batch_labels(batch, self.num_classes)
        target = batch["image"].flatten(1) + self.noise * rng.randn_like(batch["image"].flatten(1))
        loss = ((self.net(labels) - target) ** 2).mean()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def sample(self, n: int, seed: int, class_label: int | None = None, **options) -> torch.Tensor:
        labels = torch.arange(n) % self.num_classes if class_label is None else torch.full((n,), class_label)
        g = torch.Generator().manual_seed(seed)
        device = self.net.weight.device
        images = self.net(labels.to(device)) + self.noise * torch.randn(n, self.net.embedding_dim, generator=g).to(device)
        return images.view(n, *self.shape).clamp(-1, 1)

    def export(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file({"templates": self.net.weight.detach().cpu().contiguous()}, Path(out_dir) / "templates.safetensors")
