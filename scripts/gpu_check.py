"""`make gpu-check`: prove genlab's GPU paths with one command on one GPU (the parts' time limits add to 7.5 minutes).

A GPU is at hand only now and then, for a few minutes: this script is prepared so that the
whole proof is one call. In order, each part in its own process with its own time limit:

1. `pytest -m gpu tests/test_gpu.py`: every family in fp16 (with the grad scaler) and bf16,
   torch.compile + channels_last + TF32 against the plain run, bf16 resume bitwise with the
   GPU-resident dataset, 8-bit Adam, micro-batch probing with a real out-of-memory error;
2. `scripts/bench.py --mfu`: images/s, training FLOPs per image and MFU at CIFAR-10 size, compile off/on;
3. `scripts/bench_controlnet.py`: peak memory and it/s of ControlNet training at SD 1.5 shapes
   (512 px; micro-batch 1 and 4; checkpointing off/on; ControlNet and Control-LoRA);
4. `--fsdp-part` (GPU runs only): strategy=fsdp on the one GPU (world size 1, NCCL): every declared
   block wrapped, the DCP checkpoint's files, a resume bitwise, and the memory plan against what the
   GPU held (the plan's states = held_bytes exactly; its total against torch.cuda.max_memory_allocated).

Writes benchmarks/gpu-check-<gpu>.json: the GPU, versions, the command, and each part's exit
code, time, results (the tests' outcomes by name) and the tail of its output. Commit it.

    python scripts/gpu_check.py               # the real thing (needs CUDA)
    python scripts/gpu_check.py --smoke       # on a CPU: the same parts at toy sizes (tests use it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def parts(smoke: bool, tmp: Path) -> list[dict]:
    """(name, command, time limit) of each part; --smoke shrinks the benchmarks to seconds."""
    # The Hydra overrides come first: after a many-valued option (--families, --checkpointing) they would be
    # read as its values. The smoke trains in fp32 at batch 2 (the GPU run: bf16 at 128): a CPU without bf16
    # units emulates it, and the 35.7M U-Net's bf16 steps at 128 took over 540 s on a 2-core EPYC (fp32 at
    # batch 2: 8 s). The smoke checks the script, not the speed.
    mfu = ["--mfu", "--steps", "20", "--warmup", "5"] if not smoke else [
        "trainer.batch_size=2", "trainer.mixed_precision=no", "--mfu", "--families", "ddpm", "--mfu-compile", "off", "--steps", "2", "--warmup", "1"]
    controlnet = ["--steps", "8", "--warmup", "3"] if not smoke else [
        "trainer.mixed_precision=no", "--size", "tiny", "--image-size", "32", "--batch-sizes", "1", "--steps", "2",
        "--warmup", "1", "--modes", "controlnet", "--checkpointing", "off"]
    # --smoke runs on a CPU beside other tests (CI's slow suite), on machines slower than a GPU by far: 3x.
    scale = 3 if smoke else 1
    return [
        {"name": "gpu_tests", "limit": 180 * scale, "command": [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                                      "tests/test_gpu.py", f"--junitxml={tmp / 'gpu_tests.xml'}"]},
        {"name": "mfu", "limit": 90 * scale, "command": [PY, "-m", "scripts.bench", *mfu, "--out", str(tmp / "mfu.json")]},
        {"name": "controlnet", "limit": 120 * scale, "command": [PY, "-m", "scripts.bench_controlnet", *controlnet,
                                                         "--out", str(tmp / "controlnet.json")]},
    ] + ([] if smoke else [  # on a CPU, tests/test_fsdp.py runs fsdp_part itself
        {"name": "fsdp", "limit": 60, "command": [PY, "-m", "scripts.gpu_check", "--fsdp-part", str(tmp / "fsdp.json")]},
    ])


FSDP_STEPS = ["trainer=debug", "logger=none", "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.log_every=1",
              "trainer.sample_every=0", "trainer.ema=0.9", "strategy=fsdp"]
FSDP_TINY = ["data.image_size=8", "model.unet.block_out_channels=[16,16]", "model.unet.norm_num_groups=4",
             "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]", "model.unet.attention_head_dim=8",
             "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]"]


def fsdp_part(out: Path, scratch: Path | None = None) -> dict:
    """Part 4: strategy=fsdp in this process on one device (a group of one). Writes `out` and returns the checks;
    on a CPU (tests) the tiny U-Net, on a GPU the default DDPM U-Net in bf16."""
    import tempfile

    import torch
    from hydra import compose, initialize_config_dir

    from genlab.config import config_dir
    from genlab.train.memory_plan import plan_config

    gpu = torch.cuda.is_available()
    overrides = [*FSDP_STEPS, *(["trainer.mixed_precision=bf16"] if gpu else FSDP_TINY)]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg, stopped = compose("train", overrides), compose("train", [*overrides, "trainer.max_steps=2"])
    scratch = scratch or Path(tempfile.mkdtemp(prefix="gpu-check-fsdp-"))
    seen, peak = _fsdp_runs(cfg, stopped, scratch)
    plan = plan_config(cfg, gpus=1)["fsdp"]
    result = {"checks": _fsdp_checks(scratch, seen, plan), "held_bytes": seen.get("held"), "plan": plan,
              "overrides": overrides, "max_memory_allocated": peak,
              # what the GPU held at its peak over what the plan sums (states + activations + gathered):
              # above 1 by the allocator's and the kernels' workspaces, the CUDA context is not counted in either
              "peak_over_plan": round(peak / sum(plan.values()), 3) if peak else None}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _fsdp_runs(cfg: Any, stopped: Any, scratch: Path) -> tuple[dict, int | None]:
    """Train `cfg` straight through (probing what a step holds and that the blocks are wrapped), then `stopped`
    and its resume to `cfg`'s end. Returns (what the probe saw, the GPU's peak of the straight run or None)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from genlab.train import loop
    from genlab.train.job import run_training
    from genlab.train.memory_plan import _frozen_modules, held_bytes
    from genlab.train.strategy import shard_units

    gpu = torch.cuda.is_available()
    seen, calls, built, grad_norm = {}, [0], loop.Trainer.__init__, loop._grad_norm

    def keep(self, *args, **kwargs):
        built(self, *args, **kwargs)
        seen.setdefault("trainer", self)

    def probe(params, max_norm):  # after the backward, before the step
        calls[0] += 1
        if calls[0] == 2:
            t = seen["trainer"]
            seen["held"] = held_bytes(t.family.networks(), t.optimizers, t.ema, _frozen_modules(t.family))
            units = [u for us in shard_units(t.family).values() for u in us]
            seen["wrapped"] = bool(units) and all(isinstance(u, FSDPModule) for u in units)
        return grad_norm(params, max_norm)

    loop.Trainer.__init__, loop._grad_norm = keep, probe
    try:
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        run_training(cfg, scratch / "straight")
        peak = torch.cuda.max_memory_allocated() if gpu else None
        loop.Trainer.__init__, loop._grad_norm = built, grad_norm
        run_training(stopped, scratch / "stopped")
        run_training(cfg, scratch / "stopped", resume=True)
    finally:
        loop.Trainer.__init__, loop._grad_norm = built, grad_norm
        if dist.is_initialized():
            dist.destroy_process_group()
    return seen, peak


def _fsdp_checks(scratch: Path, seen: dict, plan: dict) -> dict[str, bool]:
    """The fsdp part's verdicts: blocks wrapped, a DCP checkpoint, a bitwise resume, the plan equal to what was held."""
    import torch
    from safetensors.torch import load_file

    from genlab.run_dir import RunDir

    runs = [RunDir(scratch / "straight"), RunDir(scratch / "stopped")]
    rows = [[{k: v for k, v in row.items() if k != "images_per_s"} for row in run.read_metrics()] for run in runs]
    weights = [{k: v for f in sorted(run.export.rglob("*.safetensors")) for k, v in load_file(f).items()} for run in runs]
    files = {p.name for p in (runs[0].checkpoints / "step_000004").iterdir()}
    states = ("params", "grads", "optimizer", "ema")
    return {
        "blocks_wrapped": seen.get("wrapped", False),
        "dcp_checkpoint": {".metadata", "__0_0.distcp", "COMPLETE"} <= files,
        "resume_bitwise": rows[0] == rows[1] and weights[0].keys() == weights[1].keys()
        and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]),
        "plan_states_equal_held": {k: plan[k] for k in states} == seen.get("held"),
    }


def run_part(part: dict) -> dict:
    """Run one part; a failure or a timeout is recorded, never fatal: the other parts still run."""
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(part["command"], cwd=ROOT, capture_output=True, text=True, timeout=part["limit"], env=env)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        code, output = "timeout", f"{error.stdout or ''}{error.stderr or ''}"
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
    return {"command": " ".join(part["command"]), "exit_code": code, "seconds": round(time.perf_counter() - start, 1),
            "output_tail": output[-3000:]}


def test_outcomes(junit: Path) -> dict[str, str]:
    """{test name: passed | failed | skipped (reason)} from pytest's JUnit XML."""
    if not junit.exists():
        return {}
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name")
        skipped = case.find("skipped")
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        outcomes[name] = ("failed" if failed is not None else
                          f"skipped ({skipped.get('message', '')})" if skipped is not None else "passed")
    return outcomes


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "host_cores": os.cpu_count()}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, for a CPU (the GPU tests then skip)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/gpu-check-<gpu>.json")
    parser.add_argument("--fsdp-part", type=Path, help=argparse.SUPPRESS)  # part 4, in a process of its own
    args = parser.parse_args(argv)
    if args.fsdp_part:
        checks = fsdp_part(args.fsdp_part)["checks"]
        raise SystemExit(0 if all(checks.values()) else f"fsdp checks failed: {checks}")
    info = machine()
    if info["gpu"] is None and not args.smoke:
        parser.error("no CUDA GPU is visible: run this on a GPU machine, or use --smoke to check the script on a CPU")
    tmp = ROOT / "benchmarks" / ".gpu_check"
    tmp.mkdir(parents=True, exist_ok=True)
    report = {"machine": info, "command": "python scripts/gpu_check.py" + (" --smoke" if args.smoke else ""),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    for part in parts(args.smoke, tmp):
        print(f"gpu-check: {part['name']} ...", flush=True)
        report["parts"][part["name"]] = result = run_part(part)
        produced = tmp / f"{part['name']}.json"
        if produced.exists():
            result["results"] = json.loads(produced.read_text())
        print(f"gpu-check: {part['name']}: exit {result['exit_code']} in {result['seconds']} s", flush=True)
    report["parts"]["gpu_tests"]["results"] = test_outcomes(tmp / "gpu_tests.xml")
    name = "".join(c if c.isalnum() else "-" for c in (info["gpu"] or "cpu-smoke").lower()).strip("-")
    out = args.out or ROOT / "benchmarks" / f"gpu-check-{name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
