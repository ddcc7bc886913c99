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
                 compare_samplers: bool = False, allow: tuple[str, ...] = (), trust_run: bool = False,
                 ema_length: float | None = None) -> dict[str, Any]:
    """Evaluate a run; writes RUN_DIR/eval/metrics.json (and samplers.json/.png when asked)."""
    from rich.console import Console

    run = RunDir(run_dir)
    family, cfg = load_family(run, checkpoint, use_ema, allow=allow, trust_run=trust_run, ema_length=ema_length)
    device = next(iter(family.networks().values())).parameters().__next__().device
    evaluator = Evaluator(cfg, device)
    started = time.perf_counter()
    metrics = evaluator.evaluate(family, n_samples=n)
    out_dir = run.eval_dir
    report = {"checkpoint": checkpoint, "ema": use_ema if ema_length is None else f"length {ema_length}",
              "seconds": time.perf_counter() - started, **metrics}
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


def ema_sweep_command(run_dir: Path, checkpoint: str, lengths: list[float], n: int | None = None,
                      allow: tuple[str, ...] = (), trust_run: bool = False) -> list[dict[str, Any]]:
    """The metrics of the run's own EMA and of each post-hoc EMA length, to eval/ema_sweep.json and a table.

    Every row samples with the same seeds: only the weights differ.
    """
    from rich.console import Console
    from rich.table import Table

    run = RunDir(run_dir)
    rows = []
    for length in [None, *lengths]:
        family, cfg = load_family(run, checkpoint, allow=allow, trust_run=trust_run, ema_length=length)
        device = next(iter(family.networks().values())).parameters().__next__().device
        metrics = Evaluator(cfg, device).evaluate(family, n_samples=n)
        rows.append({"ema_length": length, "ema": "trainer.ema" if length is None else f"post-hoc {length}", **metrics})
    # One row per metric, one column per EMA: what a length trades is read across a row.
    table = Table(title=f"EMA lengths of {run_dir} ({checkpoint})")
    table.add_column("metric")
    for row in rows:
        table.add_column(row["ema"], justify="right")
    for key in (k for k in rows[0] if k not in ("ema_length", "ema") and "@" not in k):
        table.add_row(key, *(f"{r[key]:.4g}" if isinstance(r.get(key), (int, float)) else str(r.get(key, ""))
                             for r in rows))
    Console().print(table)
    atomic_write(run.eval_dir / "ema_sweep.json", json.dumps({"checkpoint": checkpoint, "rows": rows}, indent=2))
    print(f"wrote {run.eval_dir / 'ema_sweep.json'}")
    return rows


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
