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


class BadAt(Toy):
    """A Toy whose loss is NaN ("loss"), or finite with an inf gradient ("grad"), at the given loss calls (1-based)."""

    def __init__(self, image_size: int, channels: int, calls: list[int], bad: str = "loss", constant_loss: bool = False):
        super().__init__(image_size, channels)
        self.bad_calls, self.bad, self.constant_loss, self.calls_made = set(calls), bad, constant_loss, 0

    def loss(self, phase, batch, step, rng):
        self.calls_made += 1
        loss, logs = super().loss(phase, batch, step, rng)
        if self.constant_loss:  # no gradient, no progress: a plateau
            loss = loss * 0 + 1.0
        if self.calls_made in self.bad_calls:
            if self.bad == "loss":
                loss = loss * float("nan")
            else:  # d sqrt(u)/du at u = 0 is inf: a finite loss with an infinite gradient
                u = self.net.weight.sum()
                loss = loss + torch.sqrt(u - u.detach())
        return loss, {"loss": loss.detach()}


class TwoPhases(Toy):
    """Phase "b" back-propagates through net "a" too (as a GAN's G phase does through D)."""

    def __init__(self, image_size: int, channels: int):
        super().__init__(image_size, channels)
        self.a, self.b, self.leftover = self.net, nn.Linear(self.dim, self.dim), []

    def networks(self):
        return {"a": self.a, "b": self.b}

    def param_groups(self):
        return {"a": [{"params": list(self.a.parameters())}], "b": [{"params": list(self.b.parameters())}]}

    def phases(self, step):
        return ["a", "b"]

    def loss(self, phase, batch, step, rng):
        mine = self.a if phase == "a" else self.b
        self.leftover.append(sum(float(p.grad.abs().sum()) for p in mine.parameters() if p.grad is not None))
        x = batch["image"].flatten(1)
        loss = (self.a(x) ** 2).mean() if phase == "a" else (self.b(self.a(x)) ** 2).mean()
        return loss, {f"loss_{phase}": loss.detach()}


class Diagnosing(Toy):
    """A Toy with the Diagnosed capability: records how many steps it had trained at each check."""

    def __init__(self, image_size: int, channels: int, diag_every: int):
        super().__init__(image_size, channels, noise=True)
        self.diag_every, self.diagnosed, self.steps = diag_every, [], set()

    def loss(self, phase, batch, step, rng):
        self.steps.add(step)
        return super().loss(phase, batch, step, rng)

    def diagnose(self, batch):
        torch.randn(100)  # a check may draw random numbers: training must not notice
        self.diagnosed.append(len(self.steps))
        return []
