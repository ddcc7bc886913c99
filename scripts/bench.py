"""Does the runner cost anything? genlab's loop against a bare PyTorch loop.

For each family, on the same model, data (digits in memory), batch and optimizer:
- bare: `loss = family.loss(...); loss.backward(); opt.step(); ema.step()`, nothing else
  (the same EMA as genlab's: foreach updates);
- genlab: the real Trainer (Accelerate, accumulation bookkeeping, gradient clipping at the
  config's trainer.grad_clip, NaN checks, logging).
The ratio comes from both loops in one process taking turns every `--window` steps
(`measure_paired`): separate processes on a shared 2-core VM differ by 15-25% in speed from
one to the next, more than the runner costs (issue 14: a flow DDPM's 0.816 was that).
Each loop also runs alone in its own process (peak memory, images/s), alternating bare and
genlab `--repeats` times, the best of each kept. Also times `genlab --help` and
time-to-first-step of `genlab train`.

With `--levers`, measures instead the speed switches (channels_last, torch.compile, bf16,
TF32, fused/foreach optimizers, SDPA attention, on-device data, DataLoader workers, pinned
memory, persistent workers, prefetch) one at a time, on and off, for genlab's loop on the
DDPM/digits workload (interleaved repeats, best of each), into the same JSON under "levers".

    python -m scripts.bench                       # all families, writes benchmarks/bench-<machine>.json
    python -m scripts.bench --families ddpm --steps 200
    python -m scripts.bench --levers              # every lever; or name some: --levers compile bf16
    python -m scripts.bench --mfu                 # a GPU: CIFAR-size images/s and MFU, compile off/on
    python -m scripts.bench --data                # data paths: PNG folder vs in-memory vs diffusers' script,
                                                  # start-up on 100,000 files, cached latents (scripts/bench_data.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from scripts.bench_loop import (GENLAB, ROOT, GlobalRandom, compose_config, default_out, in_subprocess, machine_name,
                                 pooled, run_in_subprocess, time_to_first_step)


# name: (overrides with the lever on, with it off, overrides of both, effect only on a GPU, what it does).
# Data levers that concern a DataLoader run with data.on_device=false (digits otherwise skip the loader).
DATALOADER = ["data.on_device=false"]
LEVERS = {
    "channels_last": (["trainer.channels_last=true"], ["trainer.channels_last=false"], [], False,
                      "NHWC memory format for the networks"),
    "compile": (["trainer.compile=true"], ["trainer.compile=false"], [], False, "torch.compile of the networks"),
    "bf16": (["trainer.mixed_precision=bf16"], ["trainer.mixed_precision=no"], [], None,
             "bf16 autocast (GPU-only effect on a CPU without bf16 units)"),
    "tf32": (["trainer.tf32=true"], ["trainer.tf32=false"], [], True, "TF32 matmuls/convolutions (Ampere+ GPUs)"),
    "fused_optimizer": (["optimizer.fused=true"], ["optimizer.fused=null"], [], False,
                        "one fused AdamW kernel (CPU and CUDA) instead of the default foreach updates"),
    "foreach_optimizer": (["optimizer.foreach=true"], ["optimizer.foreach=false"], [], False,
                          "multi-tensor AdamW updates (the default) instead of torch's per-tensor loop"),
    "sdpa_attention": (["model.attention=sdpa"], ["model.attention=eager"], [], False,
                       "torch's scaled_dot_product_attention instead of matmul-softmax-matmul"),
    "on_device_data": (["data.on_device=true"], ["data.on_device=false"], [], False,
                       "dataset resident on the device, indexed once per batch, instead of a per-item DataLoader"),
    "dataloader_workers": (["data.num_workers=2"], ["data.num_workers=0"], DATALOADER, False,
                           "2 DataLoader worker processes instead of loading in the training process"),
    "persistent_workers": (["data.persistent_workers=true"], ["data.persistent_workers=false"],
                           [*DATALOADER, "data.num_workers=2"], False, "workers kept alive across epochs"),
    "prefetch_factor": (["data.prefetch_factor=4"], ["data.prefetch_factor=2"], [*DATALOADER, "data.num_workers=2"],
                        False, "4 batches per worker prepared ahead instead of 2"),
    "pin_memory": (["data.pin_memory=true"], ["data.pin_memory=false"], DATALOADER, True,
                   "page-locked batches for host-to-GPU copies"),
}


# CIFAR-10 size for --mfu: 32 px RGB (the digits, upsampled), and for DDPM the DDPM paper's U-Net
# (35.7M parameters, as google/ddpm-cifar10-32: 128-256-256-256, 2 blocks per level, attention at 16 px).
CIFAR_SIZE = {
    "ddpm": ["model.unet.block_out_channels=[128,256,256,256]", "model.unet.layers_per_block=2",
             "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D,DownBlock2D,DownBlock2D]",
             "model.unet.up_block_types=[UpBlock2D,UpBlock2D,AttnUpBlock2D,UpBlock2D]",
             "model.unet.norm_num_groups=32", "model.unet.attention_head_dim=256"],
    "vae": ["model.block_out_channels=[128,256,512]", "model.norm_num_groups=32"],
    "gan": ["model.g_channels=128", "model.d_channels=128"],
}
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; first match in the device name wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1}




def train_flops_per_image(family_name: str, overrides: list[str], batch_size: int = 2) -> float:
    """FLOPs of one training step per image (every phase's forward and backward), by torch's FlopCounterMode."""
    import torch
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode

    from genlab.data import build_dataset

    cfg = compose_config(family_name, overrides)
    data = build_dataset(cfg.data, "train")
    family = instantiate(cfg.model, _convert_="all").to(torch.device("cpu"))
    batch = data.get_batch(torch.arange(batch_size))
    with FlopCounterMode(display=False) as counter:
        for phase in family.phases(0):
            loss, _ = family.loss(phase, batch, 0, GlobalRandom(device="cpu"))
            loss.backward()
    return counter.get_total_flops() / batch_size


def measure_mfu(args: argparse.Namespace) -> dict:
    """Images/s and model FLOPs utilisation at CIFAR-10 size, torch.compile off and on -> the JSON's "mfu"."""
    import torch

    on_gpu = torch.cuda.is_available()
    name = machine_name()
    peak = next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None) if on_gpu else None
    results = {}
    for family in args.families:
        base = ["data.image_size=32", "data.channels=3", *CIFAR_SIZE.get(family, []), "trainer.mixed_precision=bf16",
                "trainer.batch_size=128", "trainer.sample_n=0", *args.overrides]
        flops = train_flops_per_image(family, base)
        runs = {}
        for compiled in args.mfu_compile:
            overrides = [*base, f"trainer.compile={compiled == 'on'}"]
            run = in_subprocess("genlab", family, overrides, args.steps, args.warmup)
            achieved = run["images_per_s"] * flops
            run.update(achieved_tflops=achieved / 1e12, mfu=achieved / peak if peak else None)
            runs[f"compile_{compiled}"] = run
            mfu = f"MFU {run['mfu']:.1%}" if peak else "MFU n/a (no bf16 peak known for this device)"
            print(f"{family:5s} compile {compiled:3s}: {run['images_per_s']:8.0f} img/s  "
                  f"{achieved / 1e12:7.2f} TFLOP/s  {mfu}", flush=True)
        results[family] = {"overrides": base, "train_gflops_per_image": flops / 1e9, **runs}
    return {"device": "cuda" if on_gpu else "cpu", "peak_bf16_tflops": peak / 1e12 if peak else None,
            "flops": "torch.utils.flop_counter.FlopCounterMode over one training step (forward + backward, "
                     "every phase), per image", "steps": args.steps, "warmup": args.warmup,
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]),
            "results": results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["ddpm", "vae", "gan"])
    parser.add_argument("--steps", type=int, default=150, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="steps before measuring")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop; the best is kept")
    parser.add_argument("--window", type=int, default=10,
                        help="optimizer steps per turn when both loops take turns in one process (the ratio)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. trainer.batch_size=128")
    parser.add_argument("--levers", nargs="*", default=None, metavar="LEVER",
                        help=f"measure speed levers on/off instead (all, or some of: {', '.join(LEVERS)})")
    parser.add_argument("--mfu", action="store_true", help="images/s and MFU at CIFAR-10 size (32 px RGB; DDPM: "
                        "the DDPM paper's 35.7M U-Net), bf16, batch 128, torch.compile off and on (a GPU)")
    parser.add_argument("--mfu-compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--data", nargs="*", default=None, metavar="PART",
                        help="measure the data paths instead (all, or some of: throughput paired startup cache)")
    parser.add_argument("--folder-workers", nargs="*", type=int, default=[], metavar="N",
                        help="--data throughput: also the folder path with data.num_workers=N (default config: 2)")
    parser.add_argument("--files", type=int, default=100_000, help="--data startup: PNG files in the folder")
    parser.add_argument("--cache-steps", type=int, default=40, help="--data cache: measured ControlNet steps")
    parser.add_argument("--work", default="/tmp/genlab-bench-data", help="--data: where folders and runs are made")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.data is not None:
        from scripts import bench_data

        return bench_data.main(args)

    import torch

    import genlab

    if args.levers is not None:
        return measure_levers(args)
    if args.mfu:
        return write_mfu(args)
    results = {family: compare_loops(family, args) for family in args.families
               if (ROOT / "configs" / "model" / f"{family}.yaml").exists()}
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
    out = args.out or default_out(machine)
    if out.exists():  # keep a "levers" section measured earlier
        report = {**json.loads(out.read_text()), **report}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"genlab --help: {help_s:.2f}s; wrote {out}")


def write_mfu(args: argparse.Namespace) -> None:
    """--mfu: measure images/s and MFU, added to the machine's benchmark file under "mfu"."""
    import torch

    import genlab

    out = args.out or default_out(machine_name())
    report = json.loads(out.read_text()) if out.exists() else {
        "machine": machine_name(), "python": platform.python_version(), "torch": torch.__version__,
        "genlab": genlab.__version__}
    report["mfu"] = measure_mfu(args)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} (mfu)")


def compare_loops(family: str, args: argparse.Namespace) -> dict:
    """The bare loop against genlab's for one family: in separate processes (best of --repeats) and taking turns
    in one process (the ratio that is reported)."""
    runs, paired = {"bare": [], "genlab": []}, []
    for _ in range(args.repeats):
        for kind in ("bare", "genlab"):
            runs[kind].append(in_subprocess(kind, family, args.overrides, args.steps, args.warmup))
        paired.append(run_in_subprocess(f"scripts.bench_loop.measure_paired({family!r}, {args.overrides!r}, {args.steps}, "
                                         f"{args.warmup}, {args.window})"))
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
    separate = best["genlab"]["images_per_s"] / best["bare"]["images_per_s"]
    ratio, quartiles, _ = pooled(paired)
    print(f"{family}: ratio {ratio:.3f} in one process, windows of {args.window} steps taking "
          f"turns (quartiles of the windows' ratios {', '.join(f'{q:.3f}' for q in quartiles)}); separate "
          f"processes, best of {args.repeats}: bare {best['bare']['images_per_s']:.0f} img/s, genlab "
          f"{best['genlab']['images_per_s']:.0f} img/s, ratio {separate:.3f}", flush=True)
    return {"bare": best["bare"], "genlab": best["genlab"], "ratio": ratio, "window_ratio_quartiles": quartiles,
            "ratio_separate_processes": separate, "paired_runs": paired, "all_runs": runs,
            "time_to_first_step_s": time_to_first_step(family, args.overrides)}


def cpu_has_bf16_units() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def optimizer_step_ms(family_name: str, overrides: list[str], steps: int = 30) -> dict:
    """Milliseconds of one optimizer step alone (gradients in place), per setting of the config's
    optimizer: torch's per-tensor loop, foreach (genlab's default) and fused. The optimizer is a
    few percent of a step, below what whole-run images/s can tell apart on a shared VM."""
    import torch
    from hydra.utils import instantiate

    from genlab.train.optimizers import from_config

    cfg = compose_config(family_name, overrides)
    family = instantiate(cfg.model, _convert_="all")
    params = [p for groups in family.param_groups().values() for g in groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    settings = {"per_tensor_loop": ["optimizer.foreach=false"], "foreach": [], "fused": ["optimizer.fused=true"]}
    result = {"tensors": len(params), "parameters": sum(p.numel() for p in params), "ms": {}}
    for name, setting in settings.items():
        optimizer = from_config(compose_config(family_name, [*overrides, *setting]).optimizer)(params)
        optimizer.step()  # the first step makes the state
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            optimizer.step()
            times.append((time.perf_counter() - t0) * 1e3)
        result["ms"][name] = sorted(times)[len(times) // 2]  # the median step
    return result


def measure_levers(args: argparse.Namespace) -> None:
    """Images/s of genlab's loop with each lever on and off -> the JSON's "levers" section."""
    import torch

    unknown = set(args.levers) - set(LEVERS)
    if unknown:
        sys.exit(f"unknown lever(s): {', '.join(sorted(unknown))}; choose from {', '.join(LEVERS)}")
    on_gpu = torch.cuda.is_available()
    family = args.families[0]
    results = {}
    step = None  # the optimizer step alone, when an optimizer lever is measured
    if not args.levers or {"foreach_optimizer", "fused_optimizer"} & set(args.levers):
        step = optimizer_step_ms(family, args.overrides)
        print(f"optimizer step alone, ms: {step['ms']}", flush=True)
    for name in args.levers or LEVERS:
        on, off, both, gpu_only, what = LEVERS[name]
        gpu_only = (not cpu_has_bf16_units()) if gpu_only is None else gpu_only
        base = [*args.overrides, "trainer.sample_n=0", *both]  # sample_n=0: no final sample grid to wait for
        runs = {"on": [], "off": []}
        try:
            for repeat in range(args.repeats):  # interleaved, alternating which goes first
                for state in (("on", "off") if repeat % 2 == 0 else ("off", "on")):
                    overrides = [*base, *(on if state == "on" else off)]
                    runs[state].append(in_subprocess("genlab", family, overrides, args.steps, args.warmup))
        except subprocess.CalledProcessError as error:
            results[name] = {"what": what, "error": (error.stderr or "").strip().splitlines()[-1:]}
            print(f"{name:20s} failed: {results[name]['error']}", flush=True)
            continue
        best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
        speedup = best["on"]["images_per_s"] / best["off"]["images_per_s"]
        results[name] = {"what": what, "on_overrides": on, "off_overrides": off, "common_overrides": base,
                         "on": best["on"], "off": best["off"], "speedup": speedup,
                         "gpu_only_effect": gpu_only, "all_runs": runs}
        note = "  (GPU-only effect: a CPU run says nothing about a GPU)" if gpu_only and not on_gpu else ""
        print(f"{name:20s} on {best['on']['images_per_s']:7.0f} img/s   off {best['off']['images_per_s']:7.0f} img/s"
              f"   x{speedup:.3f}{note}", flush=True)
    write_levers(args, family, on_gpu, results, step)


def write_levers(args: argparse.Namespace, family: str, on_gpu: bool, results: dict, step: dict | None) -> None:
    """The "levers" section of the machine's benchmark file: levers measured again replace their old entries."""
    import torch

    import genlab

    machine = machine_name()
    out = args.out or default_out(machine)
    report = json.loads(out.read_text()) if out.exists() else {
        "machine": machine, "python": platform.python_version(), "torch": torch.__version__,
        "genlab": genlab.__version__}
    # Levers measured again replace their old entries; the others stay (each says when and how it was measured).
    command, date = " ".join(["python", *sys.argv]), time.strftime("%Y-%m-%d %H:%M")
    for result in results.values():
        result.update(command=command, date=date)
    earlier_levers = report.get("levers", {}) if report.get("levers", {}).get("machine") == machine else {}
    earlier = earlier_levers.get("results", {})
    report["levers"] = {
        "machine": machine, "device": "cuda" if on_gpu else "cpu", "torch": torch.__version__,
        "command": command, "date": date,
        "workload": f"genlab's loop, model={family} on digits, {' '.join(args.overrides) or 'default config'}",
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "torch_threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads(),
        "results": {**earlier, **results},
    }
    if step:
        report["levers"]["optimizer_step_alone"] = {**step, "command": command, "date": date}
    elif "optimizer_step_alone" in earlier_levers:
        report["levers"]["optimizer_step_alone"] = earlier_levers["optimizer_step_alone"]
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} (levers)")


if __name__ == "__main__":
    sys.exit(main())
