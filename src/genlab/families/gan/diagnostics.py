"""`GanDiagnostics`: the usual ways GAN training goes wrong, each a one-line warning with what to try."""

from __future__ import annotations

import logging
from collections import deque

import torch

log = logging.getLogger(__name__)


class GanDiagnostics:
    """Warns (one line: reason + suggestion) when training goes the usual bad ways.

    `record` keeps detached tensors (no device sync); `check_balance` and `check_diversity`
    sync once each and are meant to run every few hundred steps.

    Args:
        window: recorded values examined by `check_balance`.
        acc_threshold: D accuracy above which, over the whole window, D dominates.
        trend: relative change between the window's halves that counts as rising/falling.
        diversity_ratio: warn when the fakes' spread is below this fraction of the reals'.
    """

    def __init__(self, window: int = 100, acc_threshold: float = 0.95, trend: float = 0.1,
                 diversity_ratio: float = 0.3):
        self.acc_threshold, self.trend, self.diversity_ratio = acc_threshold, trend, diversity_ratio
        self.history = {k: deque(maxlen=window) for k in ("d_acc", "d_loss", "g_loss")}
        self.active: set[str] = set()  # conditions already warned about (warn again only after they clear)

    def record(self, logs: dict[str, torch.Tensor]) -> None:
        for k, values in self.history.items():
            if k in logs:
                values.append(logs[k].detach())

    def _warn(self, key: str, message: str | None) -> str | None:
        if message and key not in self.active:
            log.warning(message)
        self.active.discard(key) if message is None else self.active.add(key)
        return message

    def check_balance(self) -> str | None:
        """Warn when D's accuracy stays above the threshold, or g_loss rises while d_loss falls."""
        full = {k: torch.stack(list(v)).float().cpu() for k, v in self.history.items()
                if len(v) == v.maxlen}
        message = None
        if "d_acc" in full and full["d_acc"].min() > self.acc_threshold:
            message = (f"discriminator dominates: accuracy > {self.acc_threshold} for the last {len(full['d_acc'])} "
                       "updates; try model.diffaug=[color,translation,cutout], a larger model.r1_gamma, "
                       "model.instance_noise=0.1 or a lower model.d_lr_scale")
        elif "d_loss" in full and "g_loss" in full:
            (d0, d1), (g0, g1) = ([half.mean() for half in full[k].chunk(2)] for k in ("d_loss", "g_loss"))
            scale = lambda a: self.trend * max(abs(float(a)), 1e-3)  # noqa: E731
            if g1 - g0 > scale(g0) and d0 - d1 > scale(d0):
                message = (f"discriminator is winning: g_loss rose {float(g0):.3g} -> {float(g1):.3g} while d_loss "
                           f"fell {float(d0):.3g} -> {float(d1):.3g}; try model.diffaug=[color,translation,cutout], "
                           "model.r1_gamma, or a lower model.d_lr_scale")
        return self._warn("balance", message)

    def check_diversity(self, fake: torch.Tensor, real: torch.Tensor, fake_labels: torch.Tensor | None = None,
                        real_labels: torch.Tensor | None = None) -> str | None:
        """Warn when the mean pairwise pixel distance of `fake` falls well below that of `real`.

        With labels (a conditional GAN) the spread is measured within each class and averaged
        over the classes both sets have: a generator that draws one image per class spreads
        as widely as the data across classes, so only the within-class spread shows collapse.
        """
        if fake_labels is None or real_labels is None:
            fake_spread, real_spread, where = pixel_spread(fake), pixel_spread(real), ""
        else:
            classes = [k for k in real_labels.unique().tolist()
                       if (real_labels == k).sum() >= 2 and (fake_labels == k).sum() >= 2]
            if not classes:
                return None
            fake_spread = sum(pixel_spread(fake[fake_labels == k]) for k in classes) / len(classes)
            real_spread = sum(pixel_spread(real[real_labels == k]) for k in classes) / len(classes)
            where = f" within a class ({len(classes)} classes)"
        message = None
        if fake_spread < self.diversity_ratio * real_spread:
            fixes = "model.mode_seeking=1.0, " if where else ""  # a cGAN drawing one image per class
            message = (f"sample diversity collapsed: fixed-noise fakes spread {fake_spread:.3g} vs {real_spread:.3g} "
                       f"for real images{where} (mean pairwise distance); likely mode collapse: try {fixes}"
                       "model.loss=hinge with spectral norm, model.diffaug, or a lower trainer.lr")
        return self._warn("diversity", message)


def pixel_spread(images: torch.Tensor) -> float:
    """Mean pairwise L2 distance between images (N >= 2)."""
    return torch.pdist(images.detach().flatten(1).float()).mean().item()
