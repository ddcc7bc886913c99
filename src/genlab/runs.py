"""`genlab runs`: one row per run directory found under a root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from genlab.errors import GenlabError
from genlab.families.declarations import declared
from genlab.families.logged import losses, lower_is_better
from genlab.run_dir import RunDir, find_runs


def runs_root() -> Path:
    return Path(os.environ.get("GENLAB_RUNS", "runs"))


def run_info(run: RunDir) -> dict[str, Any]:
    """What `genlab runs` shows for one run directory (raises on an unreadable config)."""
    cfg = run.read_config_data()
    target = str((cfg.get("model") or {}).get("_target_", ""))
    choices, facts = run.choices(), declared(target)
    family = facts.get("name") or choices.get("model") or target.rsplit(".", 1)[-1].lower()
    data = choices.get("data") or str(cfg["data"]["_target_"]).rsplit(".", 1)[-1].lower()
    rows = run.read_metrics()
    loss_keys = loss_keys_of(facts, rows)
    latest, last = {}, {}
    for row in rows:
        latest.update(row)
        if any(k in row for k in loss_keys):
            last = row
    best = {}
    best_ckpt = run.checkpoint("best")
    if best_ckpt is not None:
        from genlab.train.checkpoint import CheckpointCorrupt, load_state

        try:
            tracked = load_state(best_ckpt).get("best") or {}
        except CheckpointCorrupt:
            tracked = {}
        if tracked.get("best") is not None:
            best = {tracked["metric"]: tracked["best"], "step": tracked["best_step"]}
    status = run.read_status()
    return {"run": run.path, "family": family, "data": data, "step": latest.get("step", 0),
            "max_steps": cfg["trainer"]["max_steps"], "status": status["status"], "error": status.get("error", ""),
            "losses": {k: v for k, v in last.items() if k in loss_keys}, "loss_keys": loss_keys,
            "directions": dict(facts.get("metrics") or {}),  # the family's own metrics, as it declares them
            # --sort takes a latest value (fid_digits_cnn), an eval/metrics.json one, or the best (best_fid_digits_cnn)
            "metrics": {**latest, **run.read_eval(), **{f"best_{k}": v for k, v in best.items() if k != "step"}},
            "best": best}


def loss_keys_of(facts: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The logged losses: those the family declares (`Family.losses`, read by families.declarations), or
    `families.logged.losses`' fallback when it declares none or its declarations cannot be read."""
    return losses(facts.get("losses"), (k for row in rows for k in row))


def unreadable_row(run: RunDir, error: Exception) -> dict[str, Any]:
    """A row for a run whose config cannot be read: the table goes on without it."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return {"run": run.path, "family": "?", "data": "?", "step": 0, "max_steps": "?",
            "status": f"unreadable ({reason[:60]})", "losses": {}, "loss_keys": (), "directions": {}, "metrics": {},
            "best": {}}


def collect_runs(root: Path) -> list[dict[str, Any]]:
    """One info dict per run under `root`; a damaged run gets an "unreadable" row instead of an error."""
    rows = []
    for run in find_runs(root):
        try:
            rows.append(run_info(run))
        except Exception as error:  # any damage to one run must not hide the others
            rows.append(unreadable_row(run, error))
    return rows


def status_cell(row: dict[str, Any]) -> str:
    """The status, and for a failed run the first line of its error (a sweep's failed jobs say why)."""
    error = (row.get("error") or "").strip().splitlines()
    return f"{row['status']}: {error[0][:90]}" if row["status"] == "failed" and error else row["status"]


def print_runs(root: Path, sort: str | None = None) -> list[dict[str, Any]]:
    from rich.console import Console
    from rich.table import Table

    if not Path(root).is_dir():
        raise GenlabError(f"{root} is not a folder; pass the folder that holds your runs (default: runs/).")
    rows = collect_runs(root)
    if sort:
        missing = [r for r in rows if not isinstance(r["metrics"].get(sort), (int, float))]
        rows = [r for r in rows if isinstance(r["metrics"].get(sort), (int, float))]
        lower = lower_is_better(sort, {k: v for r in rows for k, v in r["directions"].items()},
                                [k for r in rows for k in r["loss_keys"]])
        rows.sort(key=lambda r: r["metrics"][sort], reverse=not lower)
        rows += missing
    table = Table(title=f"runs under {root}")
    for column in ("run", "family", "data", "steps", "last losses", "best", "status"):
        table.add_column(column)
    for r in rows:
        losses = " ".join(f"{k}={v:.4g}" for k, v in r["losses"].items() if isinstance(v, (int, float)))
        best = " ".join(f"{k}={v:.4g}" for k, v in r["best"].items() if k != "step")
        best += f" @{r['best']['step']}" if r["best"] else ""
        if sort and isinstance(r["metrics"].get(sort), (int, float)) and not sort.startswith("best_"):
            best = f"{sort}={r['metrics'][sort]:.4g} " + best
        table.add_row(str(Path(r["run"]).relative_to(root)), r["family"], r["data"],
                      f"{r['step']}/{r['max_steps']}", losses, best, status_cell(r))
    Console(width=200).print(table)
    return rows


def plot_runs(rows: list[dict[str, Any]], out: Path) -> Path:
    """Loss curves (the losses each run's family declares, see `loss_keys_of`) of `rows`, one line per run and loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        lines = RunDir(r["run"]).read_metrics()
        for key in r.get("loss_keys") or loss_keys_of({}, lines):
            points = [(line["step"], line[key]) for line in lines if isinstance(line.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=f"{Path(r['run']).name} {key}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
