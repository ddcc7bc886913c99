"""Learning-rate schedules, counted in optimizer steps (never micro-steps).

Each function takes the optimizer and returns a `LambdaLR`; configs/lr_schedule/*.yaml
build them with `_partial_: true` so the loop can call them once per optimizer. The loop
calls `.step()` exactly once per optimizer step, on every process, so the schedule is
the same whatever `grad_accum` and the number of processes are.
"""

from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _with_warmup(optimizer: Optimizer, warmup_steps: int, after: Callable[[int], float]) -> LambdaLR:
    """Linear warm-up from 0 over `warmup_steps`, then `after(steps since warm-up)`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return after(step - warmup_steps)

    return LambdaLR(optimizer, factor)


def constant(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    return _with_warmup(optimizer, warmup_steps, lambda t: 1.0)


def linear(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    decay = max(1, total_steps - warmup_steps)
    return _with_warmup(optimizer, warmup_steps,
                        lambda t: min_lr_ratio + (1 - min_lr_ratio) * max(0.0, 1 - t / decay))


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    decay = max(1, total_steps - warmup_steps)
    return _with_warmup(optimizer, warmup_steps,
                        lambda t: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / decay))))


def exponential(optimizer: Optimizer, gamma: float, warmup_steps: int = 0) -> LambdaLR:
    return _with_warmup(optimizer, warmup_steps, lambda t: gamma**t)


def polynomial(optimizer: Optimizer, total_steps: int, power: float = 1.0, warmup_steps: int = 0,
               min_lr_ratio: float = 0.0) -> LambdaLR:
    decay = max(1, total_steps - warmup_steps)
    return _with_warmup(optimizer, warmup_steps,
                        lambda t: min_lr_ratio + (1 - min_lr_ratio) * max(0.0, 1 - t / decay) ** power)


def step(optimizer: Optimizer, milestones: list[int], gamma: float = 0.1, warmup_steps: int = 0) -> LambdaLR:
    """Piecewise constant: x gamma at each milestone (absolute optimizer steps)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return gamma ** sum(step >= m for m in milestones)

    return LambdaLR(optimizer, factor)
