"""What a report shows, read from run directories (through `RunDir`, never by hand).

Curves are downsampled here, so that a run with tens of thousands of log lines still makes
a page that opens at once: each series keeps at most `max_points` points, chosen per bucket
as the minimum and the maximum (a loss spike stays visible; a mean would hide it).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genlab.families.logged import lower_is_better
from genlab.run_dir import RunDir
from genlab.runs import run_info, unreadable_row

#: Points per curve in the page; the browser stays smooth with a few thousand per chart.
MAX_POINTS = 1000


@dataclass
class RunData:
    """One run, as a report shows it."""

    run: RunDir
    name: str                                   # its path relative to the report's folder
    config: dict[str, Any]                      # the saved config, plain data, `${...}` as saved (a derived key never "differs")
    command: list[str]                          # the command lines that made it
    status: dict[str, Any]                      # status.json (running -> interrupted when its process is gone)
    info: dict[str, Any]                        # genlab runs' row: family, data, step, metrics, best, ...
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # key -> (steps, values)
    eval: dict[str, Any] = field(default_factory=dict)   # eval/metrics.json
    grids: list[tuple[int | None, Path]] = field(default_factory=list)  # (step, png); final.png has step None
    logged_rows: int = 0                        # lines of metrics.jsonl (before downsampling)


def load_run(run: RunDir, base: Path, max_points: int = MAX_POINTS) -> RunData:
    """Everything the report shows of `run`; a damaged config leaves an empty config, not an error.

    A run with a link leading out of it shows nothing but that (RunDir.refuse_links_out): the
    page never embeds a file from outside the run.
    """
    name = str(run.path.relative_to(base)) if run.path != base and run.path.is_relative_to(base) else run.path.name
    try:
        run.refuse_links_out()
    except Exception as error:
        info = unreadable_row(run, error)  # its status names the link, as `genlab runs` shows it
        return RunData(run=run, name=name, config={}, command=[], status={"status": info["status"]}, info=info)
    try:
        info = run_info(run)
        config = run.read_config_data()
    except Exception as error:  # one damaged run must not hide the others
        info, config = unreadable_row(run, error), {}
    rows = run.read_metrics()
    return RunData(run=run, name=name, config=config, command=run.command(), status=run.read_status(), info=info,
                   series={k: downsample(*v, max_points) for k, v in split_series(rows).items()},
                   eval=run.read_eval(), grids=run.sample_grids(), logged_rows=len(rows))


#: `${name:...}`: a resolver call (oc.env reads the environment, genlab_new_dir creates a folder).
_RESOLVER_CALL = re.compile(r"\$\{\s*[\w.\-]+\s*:")


def resolved(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its `${key}` references filled in, for display; resolver calls stay as saved text.

    A report or a model card is read by others, so it never shows the environment of whoever
    renders it: `${oc.env:HF_TOKEN}` (or any `${name:...}`) is kept as that text, and a reference
    to such a key shows the text too. As saved when a reference cannot be resolved.
    """
    from omegaconf import OmegaConf

    def literal(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: literal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [literal(v) for v in value]
        if isinstance(value, str) and _RESOLVER_CALL.search(value):
            return value.replace("${", "\\${")  # OmegaConf's escape: the text itself, never resolved
        return value

    try:
        return OmegaConf.to_container(OmegaConf.create(literal(config)), resolve=True)
    except Exception:  # a dangling reference: show what was saved
        return config


def split_series(rows: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.jsonl rows -> {key: (steps, values)} for every finite numeric key but `step`."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps, values = out.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(float(value))
    return out


def downsample(steps: list[int], values: list[float], max_points: int) -> tuple[list[int], list[float]]:
    """At most `max_points` points: per bucket of consecutive points, its minimum and maximum, in step order."""
    if len(steps) <= max_points:
        return list(steps), list(values)
    buckets = max(1, max_points // 2)
    size = len(steps) / buckets
    kept: list[int] = []
    for b in range(buckets):
        lo, hi = int(b * size), int((b + 1) * size)
        if lo >= hi:
            continue
        chunk = range(lo, hi)
        kept += sorted({min(chunk, key=values.__getitem__), max(chunk, key=values.__getitem__)})
    if kept[-1] != len(steps) - 1:  # the last logged value is what people look for
        kept[-1] = len(steps) - 1
    return [steps[i] for i in kept], [values[i] for i in kept]


def throughput(data: RunData) -> dict[str, Any]:
    """Steps done and planned, images/s (mean and last), and the status with its time."""
    rates = data.series.get("images_per_s", ([], []))[1]
    status = data.status
    when = status.get("time")
    return {"status": status.get("status", "unknown"), "step": data.info.get("step", 0),
            "max_steps": data.info.get("max_steps", "?"),
            "images_per_s_mean": sum(rates) / len(rates) if rates else None,
            "images_per_s_last": rates[-1] if rates else None,
            "status_time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else None,
            "host": status.get("host"), "error": status.get("error")}


def loss_keys(runs: list[RunData]) -> list[str]:
    """The runs' losses, as `genlab runs` finds them (declared by each family; see `families.logged.losses`)."""
    return list(dict.fromkeys(k for data in runs for k in data.info.get("loss_keys", ())))


def objective_is_lower(runs: list[RunData], objective: str) -> bool:
    """Does `objective` improve downwards, as the runs' families declare it (else genlab eval's defaults)?"""
    declared = {k: v for data in runs for k, v in data.info.get("directions", {}).items()}
    return lower_is_better(objective, declared, loss_keys(runs))


def objective_of(runs: list[RunData]) -> str | None:
    """The sweep's objective: `sweep_objective` of the trials' config, else the loss (`loss`, or the first declared)."""
    for data in runs:
        if data.config.get("sweep_objective"):
            return str(data.config["sweep_objective"])
    logged = {k for data in runs for k in data.info.get("metrics", {})}
    keys = [k for k in loss_keys(runs) if k in logged]
    return "loss" if "loss" in keys else next(iter(keys), None)


def objective_value(data: RunData, objective: str | None) -> float | None:
    """The trial's value of `objective`: from eval/metrics.json, the best evaluation, or the last logged value."""
    value = data.info.get("metrics", {}).get(objective) if objective else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def rank(runs: list[RunData], objective: str | None) -> list[RunData]:
    """Best trial first (lower or higher is better by the objective's name); trials without a value last."""
    if not objective:
        return runs
    scored = [d for d in runs if objective_value(d, objective) is not None]
    scored.sort(key=lambda d: objective_value(d, objective), reverse=not objective_is_lower(runs, objective))
    return scored + [d for d in runs if objective_value(d, objective) is None]


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"trainer.lr": 0.001, ...} from a nested config; lists stay whole values."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def config_differences(runs: list[RunData]) -> tuple[list[str], int]:
    """The dotted config keys whose values differ between the runs, and how many keys are the same in all."""
    flats = [flatten(d.config) for d in runs]
    keys = sorted({k for flat in flats for k in flat})
    differ = [k for k in keys if len({repr(flat.get(k, "<absent>")) for flat in flats}) > 1]
    return differ, len(keys) - len(differ)
