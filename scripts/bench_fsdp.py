"""What one process holds under strategy=ddp and strategy=fsdp on 1 and 2 processes -> benchmarks/fsdp-<machine>.json.

    python scripts/bench_fsdp.py                      # DDPM U-Net (the default model's size), 4 launches, gloo on CPU
    python scripts/bench_fsdp.py --out /tmp/f.json --tiny   # the tests' tiny U-Net

Each launch trains a few steps (global batch fixed) and measures, at the second optimizer step
after the backward and before the step, the bytes of the tensors one process holds: parameters,
gradients, optimizer states, EMA (genlab.train.memory_plan.held_bytes; DTensors count their local
shard). It also keeps the logged losses, so the four runs can be compared, and what
`genlab train --plan` plans for the launch (memory_plan.plan_config). Memory is the largest over
the processes of a launch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=8", "model.unet.block_out_channels=[16,16]",
        "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]", "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]",
        "model.unet.attention_head_dim=8", "model.unet.norm_num_groups=4"]
COMMON = ["trainer=debug", "logger=none", "trainer.max_steps=3", "trainer.log_every=1", "trainer.sample_every=0",
          "trainer.checkpoint_every=0", "trainer.ema=0.9"]


def worker(out: Path, overrides: list[str]) -> None:
    """Inside one launched process: train, measure at the second step, rank 0 writes `out`."""
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from genlab.config import config_dir
    from genlab.train import loop
    from genlab.train.job import run_training
    from genlab.train.memory_plan import held_bytes, plan_config

    trainers, measured, calls, every = [], {}, [0], []
    built = loop.Trainer.__init__

    def keep(self, *args, **kwargs):
        built(self, *args, **kwargs)
        trainers.append(self)

    grad_norm = loop._grad_norm

    def probe(params, max_norm):  # after the backward, before the optimizer step: everything is held
        calls[0] += 1
        if calls[0] == 2:
            t = trainers[0]
            measured.update(held_bytes(t.family.networks(), t.optimizers, t.ema))
            world = dist.get_world_size() if dist.is_initialized() else 1
            every[:] = [None] * world  # gathered now: the process group ends with the training
            if world > 1:
                dist.all_gather_object(every, dict(measured))
            else:
                every[:] = [dict(measured)]
        return grad_norm(params, max_norm)

    loop.Trainer.__init__, loop._grad_norm = keep, probe
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides)
    run = out.with_suffix(".run")  # one run directory for every process of the launch
    run_training(cfg, run)
    rank, world = int(os.environ.get("RANK", 0)), len(every)
    if rank == 0:
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        most = {k: max(m[k] for m in every) for k in measured}
        strategy = "fsdp" if cfg.strategy._target_.endswith("FSDP") else "ddp"
        plan = plan_config(cfg, world)[strategy]  # genlab train --plan's numbers for this launch
        out.write_text(json.dumps({"held_bytes": most, "held_bytes_per_rank": every, "plan": plan, "losses": losses}))


def launch(processes: int, overrides: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, __file__, "--worker", str(out), *overrides]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                   str(processes), "--main_process_port", str(port), __file__, "--worker", str(out), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def machine_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="the JSON to write (default benchmarks/fsdp-<machine>.json)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny U-Net (seconds) instead of the default one")
    parser.add_argument("--global-batch", type=int, default=8)
    args, overrides = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, overrides)
    import torch

    base = [*COMMON, *(TINY if args.tiny else []), *overrides]
    results, scratch = {}, Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    for strategy in ("ddp", "fsdp"):
        for processes in (1, 2):
            name = f"{strategy}_{processes}"
            started = time.perf_counter()
            results[name] = launch(processes, [*base, f"strategy={strategy}",
                                               f"trainer.batch_size={args.global_batch // processes}"],
                                   scratch / f"{name}.json")
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            held = results[name]["held_bytes"]
            print(f"{name}: {held} ({results[name]['seconds']} s)", flush=True)
    total = {k: sum(v["held_bytes"][p] for p in ("params", "grads", "optimizer")) for k, v in results.items()}
    summary = {
        "params_grads_optimizer_bytes": total,
        "fall_1_to_2_processes": {s: round(total[f"{s}_1"] / total[f"{s}_2"], 3) for s in ("ddp", "fsdp")},
        "plan_states_equal_held": {k: all(v["plan"][s] == v["held_bytes"][s] for s in v["held_bytes"])
                                   for k, v in results.items()},
        "max_loss_rel_diff_vs_ddp_1": {k: max(abs(a - b) / abs(b) for a, b in zip(v["losses"], results["ddp_1"]["losses"]))
                                       for k, v in results.items()},
    }
    print(json.dumps(summary, indent=2))
    safe = "".join(c if c.isalnum() else "-" for c in machine_name().lower()).strip("-")
    out = args.out or ROOT / "benchmarks" / f"fsdp-{safe}.json"
    out.write_text(json.dumps({
        "what": "bytes one process holds at the second optimizer step (after backward, before step): parameters, "
                "gradients, optimizer states (AdamW), EMA; the largest over the processes of each launch",
        "machine": machine_name(), "python": platform.python_version(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", "scripts/bench_fsdp.py", *sys.argv[1:]]),
        "overrides": base, "global_batch": args.global_batch, "summary": summary, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
