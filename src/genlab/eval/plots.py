"""Plots of evaluation results, drawn with matplotlib's Agg canvas (no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter


def plot_quality_vs_steps(rows: list[dict[str, Any]], metric: str, out_path: str | Path,
                          title: str | None = None) -> Path:
    """Quality and time per image against sampling steps, one line per sampler.

    Args:
        rows: from `Evaluator.compare_samplers`: each has "sampler", "steps",
            "seconds_per_image" and `metric`.
        metric: the quality metric to draw, e.g. "fid_digits_cnn".
        out_path: the PNG to write (parent folders are created).

    Returns:
        The PNG's path.
    """
    by_sampler: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_sampler[row["sampler"]].append(row)
    # A Figure without pyplot: no global backend state, safe in a training process.
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    quality, speed = fig.subplots(1, 2)
    for sampler, points in by_sampler.items():
        points = sorted(points, key=lambda r: r["steps"])
        steps = [r["steps"] for r in points]
        quality.plot(steps, [r[metric] for r in points], marker="o", label=sampler)
        speed.plot(steps, [r["seconds_per_image"] * 1000 for r in points], marker="o", label=sampler)
    all_steps = sorted({r["steps"] for r in rows})
    for ax, ylabel in ((quality, metric), (speed, "ms per image")):
        ax.set_xscale("log")  # steps span 10 to 1000
        ax.set_xticks(all_steps)  # label the step counts themselves, as plain numbers
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log" if ax is speed else "linear")  # DDPM 1000 is ~100x DDIM 10
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title or f"{metric} and time per image against sampling steps")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return out_path
