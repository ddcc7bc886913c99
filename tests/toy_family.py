"""A deterministic family for testing the loop's arithmetic (no randomness in the loss)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Toy:
    """A linear autoencoder-ish map trained with MSE to reproduce its input."""

    def __init__(self, image_size: int, channels: int, noise: bool = False):
        torch.manual_seed(0)
        self.ema_network, self.num_classes = "net", None
        self.shape = (channels, image_size, image_size)
        self.dim = channels * image_size * image_size
        self.net = nn.Linear(self.dim, self.dim)
        self.noise = noise

    def networks(self):
        return {"net": self.net}

    def param_groups(self):
        return {"net": [{"params": list(self.net.parameters())}]}

    def phases(self, step):
        return ["net"]

    def to(self, device, dtype=None):
        self.net.to(device)
        return self

    def loss(self, phase, batch, step, rng):
        x = batch["image"].flatten(1)
        if self.noise:  # like a diffusion model's noise
            x = x + 0.1 * rng.randn_like(x)
        loss = ((self.net(x) - batch["image"].flatten(1)) ** 2).mean()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def sample(self, n, seed, **options):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.dim, generator=g).to(self.net.weight.device)
        return self.net(z).clamp(-1, 1).view(n, *self.shape)

    def export(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), out_dir / "net.pt")


class SignalAtStep(Toy):
    """A Toy that sends itself `signum` during optimizer step `at_step` (a scheduler's warning)."""

    def __init__(self, image_size: int, channels: int, at_step: int, signum: int, noise: bool = True):
        super().__init__(image_size, channels, noise)
        self.at_step, self.signum, self.sent = at_step, signum, False

    def loss(self, phase, batch, step, rng):
        if step == self.at_step and not self.sent:
            import os

            self.sent = True
            os.kill(os.getpid(), self.signum)
        return super().loss(phase, batch, step, rng)
