"""Does the runner cost anything? genlab's loop against a bare PyTorch loop.

For each family, on the same model, data (digits in memory), batch and optimizer:
- bare: `loss = family.loss(...); loss.backward(); opt.step(); ema.step()`, nothing else;
- genlab: the real Trainer (Accelerate, accumulation bookkeeping, NaN checks, logging).
Each measurement runs in its own process (fair peak memory), alternating bare and genlab
`--repeats` times; the best images/s of each is kept (the least disturbed run). Also
times `genlab --help` and time-to-first-step of `genlab train`.

    python scripts/bench.py                       # all families, writes benchmarks/bench-<machine>.json
    python scripts/bench.py --families ddpm --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENLAB = str(Path(sys.executable).parent / "genlab")
COMMON = ["logger=none", "trainer.sample_every=0", "trainer.checkpoint_every=0", "trainer.progress=plain"]


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def _config(family: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from genlab.config import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=[f"model={family}", *COMMON, *overrides])


def measure_bare(family_name: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Images/s of the bare loop over `steps` after `warmup` steps (runs in this process)."""
    import torch
    from diffusers.training_utils import EMAModel
    from hydra.utils import instantiate

    from genlab.data import build_dataset

    cfg = _config(family_name, overrides)
    torch.manual_seed(cfg.trainer.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_dataset(cfg.data, "train").to(device)
    family = instantiate(cfg.model, _convert_="all").to(device)
    optimizers = {p: instantiate(cfg.optimizer)(g) for p, g in family.param_groups().items()}
    ema_net = getattr(family, family.ema_network) if family.ema_network and cfg.trainer.ema else None
    ema = EMAModel(ema_net.parameters(), decay=cfg.trainer.ema) if ema_net is not None else None
    if ema:
        ema.to(device)
    batch_size, n = cfg.trainer.batch_size, len(data)
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        for phase in family.phases(step):
            batch = data.get_batch(torch.randint(0, n, (batch_size,)))
            loss, _ = family.loss(phase, batch, step)
            loss.backward()
            optimizers[phase].step()
            optimizers[phase].zero_grad(set_to_none=True)
        if ema:
            ema.step(ema_net.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"images_per_s": steps * batch_size / elapsed}


def measure_genlab(family_name: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Images/s of genlab's Trainer, read from its own metrics after the warm-up window."""
    from genlab.train.loop import run_training

    cfg = _config(family_name, [*overrides, f"trainer.max_steps={warmup + steps}", f"trainer.log_every={warmup}"])
    # One log window of `warmup` steps, then windows of `warmup` steps: skip the first.
    with tempfile.TemporaryDirectory() as run_dir:
        run_training(cfg, Path(run_dir))
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    measured = [r["images_per_s"] for r in rows[1:]]
    return {"images_per_s": sum(measured) / len(measured)}


def in_subprocess(kind: str, family: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Run one measurement in a fresh process; adds its peak memory."""
    code = (f"import json, resource, sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import bench; "
            f"r = bench.measure_{kind}({family!r}, {overrides!r}, {steps}, {warmup}); "
            "import torch; r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
            "r['peak_cuda_mb'] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None; "
            "print('RESULT', json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def time_to_first_step(family: str, overrides: list[str]) -> float:
    """Seconds from `genlab train` starting to its first logged optimizer step."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        t0 = time.perf_counter()
        process = subprocess.Popen([GENLAB, "train", f"model={family}", *COMMON, *overrides, "trainer.max_steps=2",
                                    "trainer.log_every=1", f"hydra.run.dir={tmp}/run"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "WANDB_MODE": "disabled"})
        while not metrics.exists() and process.poll() is None:
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        process.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["ddpm", "vae", "gan"])
    parser.add_argument("--steps", type=int, default=150, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="steps before measuring")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop; the best is kept")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. trainer.batch_size=128")
    args = parser.parse_args()

    import torch

    import genlab

    results = {}
    for family in args.families:
        if not (ROOT / "configs" / "model" / f"{family}.yaml").exists():
            continue
        runs = {"bare": [], "genlab": []}
        for _ in range(args.repeats):
            for kind in ("bare", "genlab"):
                runs[kind].append(in_subprocess(kind, family, args.overrides, args.steps, args.warmup))
        best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
        results[family] = {
            "bare": best["bare"], "genlab": best["genlab"],
            "ratio": best["genlab"]["images_per_s"] / best["bare"]["images_per_s"],
            "all_runs": runs, "time_to_first_step_s": time_to_first_step(family, args.overrides),
        }
        print(f"{family}: bare {best['bare']['images_per_s']:.0f} img/s, genlab {best['genlab']['images_per_s']:.0f} "
              f"img/s, ratio {results[family]['ratio']:.3f}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([GENLAB, "--help"], capture_output=True, check=True)
    help_s = time.perf_counter() - t0
    machine = machine_name()
    report = {
        "machine": machine, "python": platform.python_version(), "torch": torch.__version__,
        "genlab": genlab.__version__, "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps, "warmup": args.warmup,
        "genlab_help_s": help_s, "families": results,
    }
    slug = "".join(c if c.isalnum() else "-" for c in machine.lower()).strip("-")[:60]
    out = args.out or ROOT / "benchmarks" / f"bench-{slug}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"genlab --help: {help_s:.2f}s; wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
