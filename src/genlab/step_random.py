"""The random draws of a training step, a function of where in training it is.

Every random number a family's `loss()` uses comes from the step's `StepRandom`, so a run draws
the same values on any number of processes and after any resume. It stands below the families
and the diffusion core, which both draw from it.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch


class StepRandom:
    """The random draws of one micro-batch, the same however the global batch is split over processes.

    Each draw makes the values for the whole global micro-batch (`batch_size x processes`
    items, in the order of the data) from a generator seeded by (seed, step, phase,
    micro-step, draw number) and keeps this process's slice. So 2 processes x 4 images draw
    exactly what 1 process x 8 images draws, and a resumed run draws what the straight run
    did, on any number of processes.

    Args:
        seed, step, phase, micro: where in training this micro-batch is.
        rank, world_size: this process and how many share the global batch.
        device: where the values are made (a CUDA generator on a GPU).
    """

    def __init__(self, seed: int, step: int, phase: str, micro: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.key = f"{seed}/{step}/{phase}/{micro}"
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.draws = 0

    def _generator(self) -> torch.Generator:
        self.draws += 1
        digest = hashlib.blake2b(f"{self.key}/{self.draws}".encode(), digest_size=8).digest()
        return torch.Generator(self.device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def _local(self, values: torch.Tensor) -> torch.Tensor:
        n = len(values) // self.world_size
        return values[self.rank * n:(self.rank + 1) * n]

    def draw(self, n: int, make: Callable[[int, torch.Generator], torch.Tensor]) -> torch.Tensor:
        """This process's n of the values `make(global_n, generator)` draws for the global batch.

        For samplers that take a generator (diffusers' `compute_density_for_timestep_sampling`).
        """
        return self._local(make(n * self.world_size, self._generator()))

    def randn(self, n: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(n, *shape) standard normal values: this process's n of the global batch."""
        return self._local(torch.randn(n * self.world_size, *shape, generator=self._generator(), device=self.device,
                                       dtype=dtype))

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(len(x), *x.shape[1:], dtype=x.dtype).to(x.device)

    def rand(self, n: int, *shape: int) -> torch.Tensor:
        """(n, *shape) uniform values in [0, 1)."""
        return self._local(torch.rand(n * self.world_size, *shape, generator=self._generator(), device=self.device))

    def randint(self, high: int, n: int) -> torch.Tensor:
        """(n,) integers in [0, high)."""
        return self._local(torch.randint(0, high, (n * self.world_size,), generator=self._generator(),
                                         device=self.device))
