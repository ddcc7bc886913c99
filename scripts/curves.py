"""A logged metric against optimizer steps for several runs, as one PNG and a JSON of the points.

The runs' in-training evaluations (trainer.eval_every) are what it reads, from each run's
metrics.jsonl; e.g. REPA against plain training (docs/evaluation.md):

    python -m scripts.curves RUNS/dit_digits RUNS/dit_digits_repa --metric fid_digits_cnn \\
        --out benchmarks/repa_fid_digits_cnn.png

`--with OLD.json` draws the curves of a JSON this script wrote before beside the runs' (runs of
another session, whose folders are gone); a run of the same name replaces the old curve.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from genlab.run_dir import RunDir


def points(run: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every logged row of `run` that has `metric`."""
    return [(row["step"], row[metric]) for row in RunDir(run).require().read_metrics() if metric in row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (the legend names each by its folder)")
    parser.add_argument("--metric", default="fid_digits_cnn", help="a logged key, e.g. fid_digits_cnn")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write (the JSON goes beside it)")
    parser.add_argument("--log-y", action="store_true", help="a logarithmic y axis")
    parser.add_argument("--with", dest="earlier", type=Path, default=None,
                        help="a JSON this script wrote: its curves of the same metric are drawn too")
    args = parser.parse_args(argv)
    curves = {run.name: points(run, args.metric) for run in args.runs}
    if args.earlier is not None:
        old = json.loads(args.earlier.read_text())
        if old.get("metric") != args.metric:
            parser.error(f"{args.earlier} holds {old.get('metric')}, not {args.metric}")
        curves = {**{name: [tuple(p) for p in found] for name, found in old["curves"].items()}, **curves}
    empty = [name for name, found in curves.items() if not found]
    if empty:
        parser.error(f"{', '.join(empty)} logged no {args.metric}: train with trainer.eval_every > 0")
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, found in curves.items():
        ax.plot([s for s, _ in found], [v for _, v in found], marker="o", markersize=3, label=name)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel(args.metric)
    if args.log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    args.out.with_suffix(".json").write_text(json.dumps({"metric": args.metric, "curves": curves}, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
