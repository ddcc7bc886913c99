"""`genlab runs`: one row per run directory found under a root."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from genlab.errors import GenlabError
from genlab.train.best import lower_is_better



def runs_root() -> Path:
    return Path(os.environ.get("GENLAB_RUNS", "runs"))


def _metrics_summary(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(last line with losses, latest value of every key) of a metrics.jsonl."""
    last_losses, latest = {}, {}
    if path.exists():
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    latest.update(row)
                    if any("loss" in k for k in row):
                        last_losses = row
    return last_losses, latest


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def run_info(run_dir: Path) -> dict[str, Any]:
    """What `genlab runs` shows for one run directory."""
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    choices = yaml.safe_load(hydra_file.read_text())["hydra"]["runtime"]["choices"] if hydra_file.exists() else {}
    family = choices.get("model") or cfg["model"]["_target_"].rsplit(".", 1)[-1].lower()
    data = choices.get("data") or cfg["data"]["_target_"].rsplit(".", 1)[-1].lower()
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "unknown"}
    if status["status"] == "running" and not _pid_alive(status.get("pid")):
        status["status"] = "interrupted"  # killed without a chance to say so (kill -9, node lost)
    last, latest = _metrics_summary(run_dir / "metrics.jsonl")
    evaluated = run_dir / "eval" / "metrics.json"
    metrics = json.loads(evaluated.read_text()) if evaluated.exists() else {}
    best_file = run_dir / "checkpoints" / "best" / "state.json"
    best = json.loads(best_file.read_text()).get("best") if best_file.exists() else None
    best = {best["metric"]: best["best"], "step": best["best_step"]} if best and best.get("best") is not None else {}
    return {"run": run_dir, "family": family, "data": data, "step": latest.get("step", 0),
            "max_steps": cfg["trainer"]["max_steps"], "status": status["status"],
            "losses": {k: v for k, v in last.items() if "loss" in k},
            # --sort takes a latest value (fid_digits_cnn), an eval/metrics.json one, or the best (best_fid_digits_cnn)
            "metrics": {**latest, **metrics, **{f"best_{k}": v for k, v in best.items() if k != "step"}},
            "best": best}


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent.parent for p in Path(root).rglob(".hydra/config.yaml")
                  if (p.parent.parent / "status.json").exists() or (p.parent.parent / "metrics.jsonl").exists())


def print_runs(root: Path, sort: str | None = None) -> list[dict[str, Any]]:
    from rich.console import Console
    from rich.table import Table

    if not Path(root).is_dir():
        raise GenlabError(f"{root} is not a folder; pass the folder that holds your runs (default: runs/).")
    rows = [run_info(r) for r in find_runs(root)]
    if sort:
        missing = [r for r in rows if sort not in r["metrics"]]
        rows = [r for r in rows if sort in r["metrics"]]
        rows.sort(key=lambda r: r["metrics"][sort], reverse=not lower_is_better(sort))
        rows += missing
    table = Table(title=f"runs under {root}")
    for column in ("run", "family", "data", "steps", "last losses", "best", "status"):
        table.add_column(column)
    for r in rows:
        losses = " ".join(f"{k}={v:.4g}" for k, v in r["losses"].items())
        best = " ".join(f"{k}={v:.4g}" for k, v in r["best"].items() if k != "step")
        best += f" @{r['best']['step']}" if r["best"] else ""
        if sort and sort in r["metrics"] and not sort.startswith("best_"):
            best = f"{sort}={r['metrics'][sort]:.4g} " + best
        table.add_row(str(Path(r["run"]).relative_to(root)), r["family"], r["data"],
                      f"{r['step']}/{r['max_steps']}", losses, best, r["status"])
    Console(width=200).print(table)
    return rows


def plot_runs(rows: list[dict[str, Any]], out: Path) -> Path:
    """Loss curves (every metrics.jsonl key containing "loss") of `rows`, one line per run and loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        path = Path(r["run"]) / "metrics.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        for key in sorted({k for line in lines for k in line if "loss" in k}):
            points = [(line["step"], line[key]) for line in lines if key in line]
            ax.plot(*zip(*points), label=f"{Path(r['run']).name} {key}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
