"""`make gpu-check`: prove genlab's GPU paths with one command on one GPU, in under 8 minutes.

A GPU is at hand only now and then, for a few minutes: this script is prepared so that the
whole proof is one call. In order, each part in its own process with its own time limit:

1. `pytest -m gpu tests/test_gpu.py`: every family in fp16 (with the grad scaler) and bf16,
   torch.compile + channels_last + TF32 against the plain run, bf16 resume bitwise with the
   GPU-resident dataset, 8-bit Adam, micro-batch probing with a real out-of-memory error;
2. `scripts/bench.py --mfu`: images/s, training FLOPs per image and MFU at CIFAR-10 size, compile off/on;
3. `scripts/bench_controlnet.py`: peak memory and it/s of ControlNet training at SD 1.5 shapes
   (512 px; micro-batch 1 and 4; checkpointing off/on; ControlNet and Control-LoRA).

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

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def parts(smoke: bool, tmp: Path) -> list[dict]:
    """(name, command, time limit) of each part; --smoke shrinks the benchmarks to seconds."""
    mfu = ["--mfu", "--steps", "20", "--warmup", "5"] if not smoke else [
        "--mfu", "--families", "ddpm", "--mfu-compile", "off", "--steps", "2", "--warmup", "1"]
    # The Hydra override comes first: after a many-valued option (--checkpointing) it would be read as one of its values.
    controlnet = ["--steps", "8", "--warmup", "3"] if not smoke else [
        "trainer.mixed_precision=no", "--size", "tiny", "--image-size", "32", "--batch-sizes", "1", "--steps", "2",
        "--warmup", "1", "--modes", "controlnet", "--checkpointing", "off"]
    # --smoke runs on a CPU beside other tests (CI's slow suite): its mfu part takes 96 s alone on 2 cores,
    # and a smoke run failed with a second job on the machine, so smoke limits are 3x the GPU run's.
    scale = 3 if smoke else 1
    return [
        {"name": "gpu_tests", "limit": 240 * scale, "command": [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                                      "tests/test_gpu.py", f"--junitxml={tmp / 'gpu_tests.xml'}"]},
        {"name": "mfu", "limit": 150 * scale, "command": [PY, "-m", "scripts.bench", *mfu, "--out", str(tmp / "mfu.json")]},
        {"name": "controlnet", "limit": 180 * scale, "command": [PY, "-m", "scripts.bench_controlnet", *controlnet,
                                                         "--out", str(tmp / "controlnet.json")]},
    ]


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
    args = parser.parse_args(argv)
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
