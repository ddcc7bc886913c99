"""The two loops `scripts/bench.py` compares, and what every benchmark script shares.

genlab's Trainer and a bare PyTorch loop on the same family, data, batch and optimizer, timed alone
(`measure_bare`, `measure_genlab`) or taking turns in one process (`measure_paired`); one
measurement in a fresh process (`run_in_subprocess`, which adds peak memory); the machine's name and
where its JSON goes. `bench.py` (loop, levers, MFU), `bench_data.py` (data paths) and
`bench_controlnet.py` import it; it imports none of them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GENLAB = str(Path(sys.executable).parent / "genlab")
COMMON = ["logger=none", "trainer.sample_every=0", "trainer.checkpoint_every=0", "trainer.progress=plain"]


class GlobalRandom:
    """What a bare loop draws from: torch's global RNG, with the methods of genlab's StepRandom
    (which makes every draw independent of how the batch is split over processes). The
    difference in cost between the two is part of what the benchmark ratio measures."""

    def __init__(self, device="cpu"):
        import torch

        self.torch, self.device = torch, device

    def randn(self, n, *shape, dtype=None):
        return self.torch.randn(n, *shape, device=self.device, dtype=dtype)

    def randn_like(self, x):
        return self.torch.randn_like(x)

    def rand(self, n, *shape):
        return self.torch.rand(n, *shape, device=self.device)

    def randint(self, high, n):
        return self.torch.randint(0, high, (n,), device=self.device)

    def draw(self, n, make):
        return make(n, None)  # generator None: diffusers' samplers then use the global RNG


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def compose_config(family: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from genlab.config import config_dir, hydra_args

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=hydra_args([f"model={family}", *COMMON, *overrides]))


class BareLoop:
    """The bare loop on a family of the config: `loss = family.loss(...); loss.backward(); opt.step();
    ema.step()` per phase and step, nothing else."""

    def __init__(self, family_name: str, overrides: list[str]):
        import torch
        from diffusers.training_utils import EMAModel
        from hydra.utils import instantiate

        from genlab.data import build_dataset
        from genlab.train.optimizers import from_config

        cfg = compose_config(family_name, overrides)
        torch.manual_seed(cfg.trainer.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.data = build_dataset(cfg.data, "train").to(self.device)
        self.family = instantiate(cfg.model, _convert_="all").to(self.device)
        self.optimizers = {p: from_config(cfg.optimizer)(g) for p, g in self.family.param_groups().items()}
        family = self.family
        self.ema_net = getattr(family, family.ema_network) if family.ema_network and cfg.trainer.ema else None
        # The same EMA as genlab's (foreach updates), so that the ratio measures the runner, not the EMA.
        self.ema = (EMAModel(self.ema_net.parameters(), decay=cfg.trainer.ema, use_ema_warmup=cfg.trainer.ema_warmup,
                             foreach=True) if self.ema_net is not None else None)
        if self.ema:
            self.ema.to(self.device)
        self.batch_size, self.step = cfg.trainer.batch_size, 0

    def run(self, steps: int) -> float:
        """Seconds that the next `steps` optimizer steps take."""
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            for phase in self.family.phases(self.step):
                batch = self.data.get_batch(torch.randint(0, len(self.data), (self.batch_size,)))
                loss, _ = self.family.loss(phase, batch, self.step, GlobalRandom(self.device))
                loss.backward()
                self.optimizers[phase].step()
                self.optimizers[phase].zero_grad(set_to_none=True)
            if self.ema:
                self.ema.step(self.ema_net.parameters())
            self.step += 1
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def measure_bare(family_name: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Images/s of the bare loop over `steps` after `warmup` steps (runs in this process)."""
    loop = BareLoop(family_name, overrides)
    loop.run(warmup)
    return {"images_per_s": steps * loop.batch_size / loop.run(steps)}


def measure_paired(family_name: str, overrides: list[str], steps: int, warmup: int, window: int,
                   bare: Any = None) -> dict:
    """Both loops in this one process, taking turns every `window` optimizer steps.

    genlab's real Trainer trains (`run_training`); each of its log lines closes a window of its
    own, and right then, outside genlab's timing, the bare loop runs the next `window` steps. The
    two loops so share the process (threads, allocator, imports) and the moment: on a shared
    2-core VM the speed of one process differs from the next's by 15-25% (`all_runs`), which
    best-of-2 separate processes cannot tell from a cost of genlab's. The first windows up to
    `warmup` steps are not counted.

    `bare` is the other loop (anything with `batch_size` and `run(steps) -> seconds`); by default
    the bare PyTorch loop on the same config.

    Returns:
        images_per_s of each loop over all counted windows, their ratio, and each window's rates.
    """
    from genlab.train import tracking
    from genlab.train.job import run_training

    bare = bare or BareLoop(family_name, overrides)
    skip, counted = -(-warmup // window), -(-steps // window)
    cfg = compose_config(family_name, [*overrides, f"trainer.max_steps={(skip + counted) * window}",
                                f"trainer.log_every={window}", "trainer.sample_n=0"])
    rates = {"genlab": [], "bare": []}
    log = tracking.Tracker.log

    def log_then_bare_window(tracker, step, scalars):
        log(tracker, step, scalars)
        if "images_per_s" in scalars:  # a training log line (the loop reads its clock before logging)
            rates["genlab"].append(scalars["images_per_s"])
            rates["bare"].append(window * bare.batch_size / bare.run(window))

    tracking.Tracker.log = log_then_bare_window  # this process runs nothing else
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            run_training(cfg, Path(run_dir))
    finally:
        tracking.Tracker.log = log
    genlab, bare_rates = rates["genlab"][skip:], rates["bare"][skip:]
    # Every window holds the same images, so a loop's images/s over all of them is the harmonic mean.
    genlab_rate, bare_rate = (len(r) / sum(1 / x for x in r) for r in (genlab, bare_rates))
    return {"window": window, "windows": len(genlab), "images_per_s_genlab": genlab_rate,
            "images_per_s_bare": bare_rate, "ratio": genlab_rate / bare_rate,
            "window_ratios": [g / b for g, b in zip(genlab, bare_rates)],
            "windows_genlab": genlab, "windows_bare": bare_rates}


def pooled(paired_runs: list[dict]) -> tuple[float, list[float], list[float]]:
    """Over every window of `measure_paired` runs (all hold the same images): the other loop's time
    over genlab's (> 1: genlab is faster), the quartiles of the windows' ratios, and those ratios sorted."""
    time_of = {k: sum(1 / x for run in paired_runs for x in run[f"windows_{k}"]) for k in ("bare", "genlab")}
    ratios = sorted(x for run in paired_runs for x in run["window_ratios"])
    quartiles = [ratios[round(q * (len(ratios) - 1))] for q in (0.25, 0.5, 0.75)]
    return time_of["bare"] / time_of["genlab"], quartiles, ratios


def interval_95(ratios: list[float]) -> list[float]:
    """The geometric mean of the windows' ratios, +-2 standard errors (on the log scale): where
    the true ratio lies, about 95% of the time, if windows were independent draws."""
    logs = [math.log(r) for r in ratios]
    mean, error = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    return [math.exp(mean - 2 * error), math.exp(mean + 2 * error)]


def measure_genlab(family_name: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Images/s of genlab's Trainer, read from its own metrics after the warm-up window."""
    from genlab.run_dir import RunDir
    from genlab.train.job import run_training

    cfg = compose_config(family_name, [*overrides, f"trainer.max_steps={warmup + steps}", f"trainer.log_every={warmup}"])
    # One log window of `warmup` steps, then windows of `warmup` steps: skip the first.
    with tempfile.TemporaryDirectory() as run_dir:
        run_training(cfg, Path(run_dir))
        rows = RunDir(run_dir).read_metrics()
    measured = [r["images_per_s"] for r in rows[1:]]
    return {"images_per_s": sum(measured) / len(measured)}


def in_subprocess(kind: str, family: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Run one measurement in a fresh process; adds its peak memory."""
    return run_in_subprocess(f"scripts.bench_loop.measure_{kind}({family!r}, {overrides!r}, {steps}, {warmup})")


def run_in_subprocess(call: str, check: bool = True) -> dict:
    """Evaluate `call` in a fresh process: an expression that returns a dict, naming what it calls in full
    (`scripts.bench_loop.measure_genlab(...)`); the `scripts.*` modules it names are imported first.

    Adds the process's peak memory (RSS, and CUDA where there is a GPU). With `check=False`
    a failure comes back as {"error": ...} ("out of memory" when it was) instead of raising.
    """
    modules = ", ".join(sorted(set(re.findall(r"\bscripts\.\w+", call))))
    code = (f"import json, resource, {modules}; "
            f"r = {call}; import torch; r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
            "r['peak_cuda_mb'] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None; "
            "print('RESULT', json.dumps(r))")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # `scripts` is a package
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=check,
                         env={**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        oom = "out of memory" in out.stderr.lower()
        return {"error": "out of memory" if oom else " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:])}
    return json.loads(lines[-1][len("RESULT "):])


def time_to_first_step(family: str, overrides: list[str]) -> float:
    """Seconds from `genlab train` starting to its first logged optimizer step."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        t0 = time.perf_counter()
        with open(Path(tmp) / "stderr.txt", "w") as stderr:
            process = subprocess.Popen([GENLAB, "train", f"model={family}", *COMMON, *overrides,
                                        "trainer.max_steps=2", "trainer.log_every=1", f"hydra.run.dir={tmp}/run"],
                                       stdout=subprocess.DEVNULL, stderr=stderr,
                                       env={**os.environ, "WANDB_MODE": "disabled"})
            while not metrics.exists() and process.poll() is None:
                time.sleep(0.02)
            elapsed = time.perf_counter() - t0
            process.wait()
        if not metrics.exists():  # a run that fails before its first step measures nothing
            tail = (Path(tmp) / "stderr.txt").read_text().strip().splitlines()[-2:]
            raise RuntimeError(f"genlab train exited {process.returncode} before its first step: {' | '.join(tail)}")
    return elapsed


def default_out(machine: str, prefix: str = "bench") -> Path:
    """benchmarks/<prefix>-<machine, as a file name>.json"""
    slug = "".join(c if c.isalnum() else "-" for c in machine.lower()).strip("-")[:60]
    return ROOT / "benchmarks" / f"{prefix}-{slug}.json"
