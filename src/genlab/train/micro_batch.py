"""`trainer.effective_batch_size=N`: the largest micro-batch that fits, and accumulation for the rest.

N images per optimizer step = micro-batch x grad_accum x processes. The micro-batch is
probed largest first among the divisors of N / processes: a throwaway copy of the
family runs a few forward/backward passes and one optimizer step per phase on a
micro-batch of real items; an out-of-memory error moves on to the next smaller size.
The copy is deleted and the RNG restored afterwards, so the run starts exactly as if
`trainer.batch_size` and `trainer.grad_accum` had been given.
"""

from __future__ import annotations

import copy
import gc
import random
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from genlab.data import collate_items
from genlab.errors import ConfigError, GenlabError
from genlab.step_random import StepRandom

PROBE_PASSES = 2  # forward/backward passes per phase and size; the second meets a fragmented cache
SAMPLE_ITEMS = 8  # real items read for the probe, tiled up to the micro-batch


def candidates(effective: int, num_processes: int, max_micro_batch: int | None, dataset_size: int) -> list[int]:
    """Micro-batch sizes to try, largest first: the divisors of effective / num_processes.

    Raises:
        ConfigError: when `effective` does not split evenly over the processes.
    """
    if effective % num_processes:
        lower = effective - effective % num_processes
        raise ConfigError(f"trainer.effective_batch_size={effective} does not split over {num_processes} processes; "
                          f"use a multiple of {num_processes} (e.g. {lower or num_processes} or {lower + num_processes})")
    per_process = effective // num_processes
    cap = min(max_micro_batch or per_process, dataset_size // num_processes)
    sizes = [d for d in range(min(cap, per_process), 0, -1) if per_process % d == 0]
    if not sizes:
        raise ConfigError(f"the dataset has {dataset_size} items, fewer than one per process ({num_processes})")
    return sizes


def _tile(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """`batch` repeated up to `size` items (same shapes as a real batch of that size)."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0:
            reps = -(-size // len(value))
            out[key] = value.repeat(reps, *[1] * (value.dim() - 1))[:size]
        elif isinstance(value, list):
            out[key] = (value * -(-size // len(value)))[:size]
        else:
            out[key] = value
    return out


def _fits(family: Any, make_optimizers: Callable, batch: dict[str, Any], accelerator: Accelerator,
          weight_dtype: torch.dtype | None, channels_last: bool) -> bool:
    """One size: True when the steps ran, False on an out-of-memory error."""
    probe = optimizers = None
    try:
        probe = copy.deepcopy(family).to(accelerator.device, weight_dtype)
        if channels_last:
            for network in probe.networks().values():
                network.to(memory_format=torch.channels_last)
        optimizers = make_optimizers(probe)
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        for phase in probe.phases(0):
            for _ in range(PROBE_PASSES):
                with accelerator.autocast():
                    loss, _ = probe.loss(phase, batch, 0, StepRandom(0, 0, phase, 0, device=accelerator.device))
                loss.backward()
            optimizers[phase].step()  # the optimizer's state takes memory too
            optimizers[phase].zero_grad(set_to_none=True)
        fits = True
    except torch.OutOfMemoryError:
        fits = False
    del probe, optimizers, batch  # the except clause has dropped its traceback: the memory is free now
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return fits


def probe(family: Any, make_optimizers: Callable[[Any], dict[str, torch.optim.Optimizer]], dataset: Any,
          sizes: list[int], accelerator: Accelerator, weight_dtype: torch.dtype | None = None,
          channels_last: bool = False) -> tuple[int, list[int]]:
    """The largest of `sizes` whose training steps fit in memory on every process.

    Args:
        family: the run's family, still on the CPU; only deep copies of it are trained.
        make_optimizers: builds the run's optimizers (by phase) for a family.
        dataset: the training set; a few real items are tiled up to each size.
        sizes: micro-batch sizes, largest first (see `candidates`).
        accelerator: the run's Accelerator (device, autocast, processes).
        weight_dtype, channels_last: as the run moves and formats its networks.

    Returns:
        (the chosen size, the larger sizes that ran out of memory).
    """
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    too_big = []
    with torch.random.fork_rng(devices=cuda):  # probing must not move the run's random streams
        sample = collate_items(dataset, torch.arange(min(SAMPLE_ITEMS, len(dataset))))
        for size in sizes:
            fits = torch.tensor(float(_fits(family, make_optimizers, _tile(sample, size), accelerator,
                                            weight_dtype, channels_last)), device=accelerator.device)
            if accelerator.num_processes > 1:  # every process takes the size that fits on all of them
                fits = accelerator.gather(fits.reshape(1)).min()
            if fits:
                break
            too_big.append(size)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    if len(too_big) == len(sizes):
        raise GenlabError(f"even a micro-batch of {sizes[-1]} runs out of memory; use a smaller model, "
                          "trainer.mixed_precision=bf16, or a larger device")
    return sizes[len(too_big)], too_big
