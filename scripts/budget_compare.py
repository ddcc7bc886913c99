"""What flow matching and a transformer buy on the CPU: quality after the same wall-clock budget.

Three arms on 16 px digits, each its experiment recipe with `trainer.max_steps` set by the budget:
DDPM U-Net (ddpm_digits, sampled with DDIM), flow U-Net (flow_digits, Euler) and flow DiT
(dit_digits, Euler). For each arm and budget (default 3 and 8 minutes) the run is evaluated at
1, 2, 4, 8, 16 and 50 sampling steps with both digits classifiers
-> benchmarks/budget_compare.json and benchmarks/budget_compare.png.

A budget is turned into optimizer steps with each arm's steps/s measured by a probe on a quiet
machine (`--probe-only`, all cores, nothing else running), so the training runs themselves can
then share the machine (one thread each, in parallel) without changing what they are given:

    python -m scripts.budget_compare --probe-only                      # quiet machine, ~3 min
    OMP_NUM_THREADS=1 python -m scripts.budget_compare --arms flow_unet  # one process per arm
    python -m scripts.budget_compare --plot-only                       # the figure from the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from scripts.quality import COMMON, ROOT, environment, steps_per_second, train
from genlab.eval.evaluate import Evaluator
from genlab.run_dir import load_family

log = logging.getLogger("budget_compare")
ARMS = {"ddpm_unet": ("ddpm_digits", "ddim"), "flow_unet": ("flow_digits", "euler"),
        "flow_dit": ("dit_digits", "euler")}
SAMPLING_STEPS = (1, 2, 4, 8, 16, 50)
# ddpm_digits' targets (issue 5), on both classifiers.
TARGETS = {"classes_covered": (">=", 10), "class_kl": ("<=", 0.05), "class_confidence": (">=", 0.9)}
CLASSIFIERS = ("digits_cnn", "digits_mlp")


def meets_targets(row: dict[str, float]) -> bool:
    ok = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}
    return all(ok[op](row[f"{metric}_{c}"], bound) for metric, (op, bound) in TARGETS.items() for c in CLASSIFIERS)


def update_json(path: Path, update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into the JSON at `path` (read just before writing: arms run in parallel)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in update.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(data, indent=2))
    return data


def probe(arms: list[str], out: Path, probe_steps: int) -> None:
    rates = {}
    for arm in arms:
        overrides = [f"experiment={ARMS[arm][0]}", *COMMON]
        rates[arm] = steps_per_second(overrides, probe_steps)
        log.info("%s: %.2f optimizer steps/s (%d threads)", arm, rates[arm], torch.get_num_threads())
    update_json(out, {"probe": {"steps_per_s": rates, "torch_threads": torch.get_num_threads(),
                                "load_average": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S")}})


def run_arm(arm: str, budgets: list[float], args: argparse.Namespace) -> None:
    recipe, sampler = ARMS[arm]
    rate = json.loads(args.out.read_text())["probe"]["steps_per_s"][arm]
    for minutes in budgets:
        steps = max(1, int(minutes * 60 * rate))
        run_dir = args.runs_dir / f"{arm}_{minutes:g}min"
        overrides = [f"experiment={recipe}", *COMMON, f"trainer.max_steps={steps}", *args.overrides]
        info = train(overrides, run_dir, None, args.reuse)
        family, cfg = load_family(run_dir, "latest", use_ema=True, device="cpu")
        rows = Evaluator(cfg, "cpu").compare_samplers(family, [(sampler, s) for s in SAMPLING_STEPS],
                                                      n_samples=args.eval_samples)
        for row in rows:
            row["targets_met"] = meets_targets(row)
        entry = {"recipe": recipe, "sampler": sampler, "budget_minutes": minutes, "steps": info["steps"],
                 "train_seconds": info["train_seconds"], "torch_threads": torch.get_num_threads(),
                 "eval_samples": args.eval_samples, "rows": rows, "run_dir": str(run_dir)}
        update_json(args.out, {"runs": {f"{arm}@{minutes:g}min": entry}})
        best = ", ".join(f"{r['steps']}: conf {r['class_confidence_digits_cnn']:.3f}/"
                         f"{r['class_confidence_digits_mlp']:.3f} fid {r['fid_digits_cnn']:.2f}" for r in rows)
        print(f"{arm} {minutes:g} min = {info['steps']} steps; {best}", flush=True)


def plot(out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(out.read_text())["runs"]
    metrics = [("fid_digits_cnn", "FID (digits CNN)"), ("class_confidence_digits_cnn", "confidence (digits CNN)"),
               ("class_confidence_digits_mlp", "confidence (digits MLP)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    colours = {"ddpm_unet": "tab:blue", "flow_unet": "tab:orange", "flow_dit": "tab:green"}
    longest = max(run["budget_minutes"] for run in runs.values())
    for name, run in sorted(runs.items()):
        arm = name.split("@")[0]
        style = "-" if run["budget_minutes"] == longest else "--"  # the longest budget solid, shorter ones dashed
        steps = [r["steps"] for r in run["rows"]]
        for ax, (metric, _) in zip(axes, metrics):
            ax.plot(steps, [r[metric] for r in run["rows"]], style, marker="o", color=colours[arm],
                    label=f"{arm}, {run['budget_minutes']:g} min ({run['steps']} steps)")
    for ax, (metric, title) in zip(axes, metrics):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
        ax.set_xticks(SAMPLING_STEPS, [str(s) for s in SAMPLING_STEPS])
        if metric == "fid_digits_cnn":
            ax.set_yscale("log")
        else:
            ax.axhline(0.9, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle("quality against sampling steps after the same training budget (2 CPU cores)")
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    return path


def table(out: Path) -> str:
    """The markdown table of docs/evaluation.md: FID and confidence (CNN / MLP) per sampling-step count, per arm and budget."""
    runs = json.loads(out.read_text())["runs"]
    head = "| arm | budget (steps) | " + " | ".join(f"{s} steps" for s in SAMPLING_STEPS) + " |"
    lines = [head, "|" + "---|" * (2 + len(SAMPLING_STEPS))]
    for name in sorted(runs, key=lambda n: (list(ARMS).index(n.split("@")[0]), runs[n]["budget_minutes"])):
        run = runs[name]
        cells = [f"{'**' if r['targets_met'] else ''}{r['fid_digits_cnn']:.2f}{'**' if r['targets_met'] else ''}"
                 f" ({r['class_confidence_digits_cnn']:.2f} / {r['class_confidence_digits_mlp']:.2f})"
                 for r in run["rows"]]
        lines.append(f"| {name.split('@')[0]} ({run['sampler']}) | {run['budget_minutes']:g} min ({run['steps']}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--budgets", default="3,8", help="training minutes, comma-separated")
    parser.add_argument("--probe-only", action="store_true", help="measure steps/s (quiet machine) and stop")
    parser.add_argument("--probe-steps", type=int, default=100, help="warm-up steps, then as many timed")
    parser.add_argument("--plot-only", action="store_true", help="draw the figure from the JSON and stop")
    parser.add_argument("--eval-samples", type=int, default=500, help="generated images per evaluation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "budget_compare.json")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "benchmarks" / "budget_runs")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of the same overrides")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        print(f"wrote {plot(args.out)}")
        print(table(args.out))
        return 0
    env = environment(argparse.Namespace(smoke=False))
    env["command"] = " ".join(["python", "-m", "scripts.budget_compare", *(argv if argv is not None else sys.argv[1:])])
    update_json(args.out, {"environment": env})
    if args.probe_only or "probe" not in json.loads(args.out.read_text()):
        probe(list(ARMS), args.out, args.probe_steps)
        if args.probe_only:
            return 0
    for arm in arms:
        run_arm(arm, [float(b) for b in args.budgets.split(",")], args)
    print(f"wrote {args.out}; figure: {plot(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
