"""`genlab eval RUN_DIR`: every metric the run supports, to eval/metrics.json and a table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from genlab.eval.evaluate import Evaluator
from genlab.model_card import refresh_model_card
from genlab.run_dir import RunDir, atomic_write, load_family


def eval_command(run_dir: Path, checkpoint: str = "latest", use_ema: bool = True, n: int | None = None,
                 compare_samplers: bool = False, allow: tuple[str, ...] = (), trust_run: bool = False) -> dict[str, Any]:
    """Evaluate a run; writes RUN_DIR/eval/metrics.json (and samplers.json/.png when asked)."""
    from rich.console import Console

    run = RunDir(run_dir)
    family, cfg = load_family(run, checkpoint, use_ema, allow=allow, trust_run=trust_run)
    device = next(iter(family.networks().values())).parameters().__next__().device
    evaluator = Evaluator(cfg, device)
    started = time.perf_counter()
    metrics = evaluator.evaluate(family, n_samples=n)
    out_dir = run.eval_dir
    report = {"checkpoint": checkpoint, "ema": use_ema, "seconds": time.perf_counter() - started, **metrics}
    run.write_eval(report)
    Console().print(metrics_table(metrics, f"eval of {run_dir} ({checkpoint}{', EMA' if use_ema else ''})"))
    if compare_samplers:
        from genlab.eval.plots import plot_quality_vs_steps

        with torch.no_grad():
            rows = evaluator.compare_samplers(family, n_samples=n)
        atomic_write(out_dir / "samplers.json", json.dumps(rows, indent=2))
        metric = next(k for k in rows[0] if k.startswith("fid_"))
        plot_quality_vs_steps(rows, metric, out_dir / "samplers.png")
        print(f"wrote {out_dir / 'samplers.json'} and {out_dir / 'samplers.png'}")
    print(f"wrote {run.eval_file}")
    refresh_model_card(run)  # the card's metrics are those of eval/metrics.json
    return report


def metrics_table(metrics: dict[str, float], title: str):
    """A rich Table: one row per metric, one column per sampling variant (`<metric>@<variant>`,
    e.g. a GAN's truncation), so that what a variant trades is read across a row."""
    from rich.table import Table

    variants = list(dict.fromkeys(k.split("@", 1)[1] for k in metrics if "@" in k))
    table = Table(title=title)
    table.add_column("metric")
    for column in ["value", *variants]:
        table.add_column(column, justify="right")
    for key, value in metrics.items():
        if "@" not in key:
            cells = [metrics.get(f"{key}@{v}") for v in variants]
            table.add_row(key, f"{value:.4g}", *("" if c is None else f"{c:.4g}" for c in cells))
    return table
