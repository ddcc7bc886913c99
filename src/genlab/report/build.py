"""`genlab report PATH`: a run, a sweep folder or a runs root as one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genlab.errors import GenlabError
from genlab.report import page
from genlab.report.collect import (RunData, config_differences, flatten, load_run, loss_keys, objective_is_lower,
                                   objective_of, objective_value, rank, resolved, throughput)
from genlab.report.figures import parallel_coordinates, run_curves, trial_curves
from genlab.run_dir import RunDir, atomic_write, find_runs

#: Sample grids embedded up to this many MB in all; past it they are linked (the page stays small).
DEFAULT_MAX_EMBED_MB = 4.0
#: Config keys that say how a run reports, not what it learns: left out of the trials table and the
#: parallel coordinates (the config differences still list them).
BOOKKEEPING = ("hydra.", "runs_root", "logger.", "card.", "trainer.progress", "trainer.log_every", "trainer.sample_",
               "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.preempt_signal")


def write_report(path: str | Path, out: str | Path | None = None, max_embed_mb: float = DEFAULT_MAX_EMBED_MB) -> Path:
    """Write the report of `path` (a run, or a folder of runs) and return the HTML file's path.

    Args:
        path: a run directory, a sweep folder (runs/multirun/<date>/) or a runs root.
        out: the HTML file; default PATH/report.html.
        max_embed_mb: embed the sample grids while they add up to at most this; link them past it.

    Raises:
        GenlabError: PATH holds no run.
    """
    path = Path(path)
    if not path.is_dir():
        raise GenlabError(f"{path} is not a folder; pass a run directory, a sweep folder or a runs root (see `genlab runs`).")
    run = RunDir(path)
    out = Path(out) if out else (run.report_file if run.is_run() else path / "report.html")
    if out.is_dir():
        raise GenlabError(f"--out {out} is a folder; give the HTML file to write, e.g. --out {out / 'report.html'}.")
    max_bytes = int(max_embed_mb * 1e6)
    if run.is_run():
        run.refuse_links_out()  # nothing from outside the run is embedded
        html = run_page(load_run(run, path.parent), out, max_bytes)
    else:
        runs = find_runs(path)
        if not runs:
            raise GenlabError(f"{path} holds no genlab run (no .hydra/config.yaml with metrics or checkpoints under it); "
                              "pass a folder printed by `genlab train` or `genlab runs`.")
        html = collection_page([load_run(r, path) for r in runs], path, out, max_bytes)
    try:
        atomic_write(out, html)
    except OSError as error:
        raise GenlabError(f"cannot write the report {out} ({error.strerror}); choose another place with --out.") from None
    return out


def _step_label(step: int | None) -> str:
    return "final" if step is None else f"step {step}"


def run_page(data: RunData, out: Path, max_bytes: int) -> str:
    """A run: grids over steps, curves, eval metrics, status and throughput, command and config."""
    info, facts = data.info, throughput(data)
    rate = facts["images_per_s_mean"]
    header = page.header(
        f"{data.name}", f"{info.get('family', '?')} on {info.get('data', '?')}  ·  {data.run.path.resolve()}",
        [("steps", f"{facts['step']}/{facts['max_steps']}"),
         ("images/s (mean)", f"{rate:.0f}" if rate else "?"),
         *[(k, page.fmt(v)) for k, v in info.get("losses", {}).items()][:3]],
        status=facts["status"])
    images = page.Images([p for _, p in data.grids], out, max_bytes)
    sections = []
    if data.grids:
        sections.append(page.section("Samples over training", images.notice() + page.grid_slider(
            [(_step_label(step), images.src(p)) for step, p in data.grids]), "samples"))
    else:
        sections.append(page.section("Samples over training", '<p class="note">No sample grids yet '
                                     "(trainer.sample_every=0, or the run has not reached its first grid).</p>", "samples"))
    if data.series:
        shown = sum(len(s[0]) for s in data.series.values())
        note = (f'<p class="note">{data.logged_rows} lines of metrics.jsonl; {shown} points drawn '
                "(long curves keep each stretch's minimum and maximum).</p>")
        sections.append(page.section("Curves", page.curve_controls() + page.figures_html(run_curves(data), "curves") + note,
                                     "curves"))
    sections.append(page.section("Evaluation", _eval_table(data), "eval"))
    sections.append(page.section("Status and throughput", _status_table(facts), "status"))
    sections.append(page.section("Command and config", page.pre("\n".join(data.command))
                                 + "<details open><summary>the run's config (.hydra/config.yaml, interpolations resolved)</summary>"
                                 + page.pre(page.config_yaml(resolved(data.config))) + "</details>", "config"))
    return page.document(f"genlab report: {data.name}", header, sections)


def _eval_table(data: RunData) -> str:
    metrics = {k: v for k, v in data.eval.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not metrics:
        return (f'<p class="note">No eval/metrics.json yet: <code>genlab eval {page.esc(data.run.path)}</code> '
                "computes the family's metrics.</p>")
    where = f"checkpoint {data.eval.get('checkpoint', '?')}{', EMA' if data.eval.get('ema') else ''}"
    return page.table(["metric", "value"], [[k, v] for k, v in metrics.items()]) + \
        f'<p class="note">From eval/metrics.json ({page.esc(where)}).</p>'


def _status_table(facts: dict[str, Any]) -> str:
    rows = [["status", facts["status"]], ["steps done / planned", f"{facts['step']} / {facts['max_steps']}"],
            ["images/s, mean", facts["images_per_s_mean"]], ["images/s, last", facts["images_per_s_last"]],
            ["status written", facts["status_time"]], ["host", facts["host"]], ["error", facts["error"]]]
    return page.table(["", ""], [r for r in rows if r[1] is not None])


def collection_page(runs: list[RunData], root: Path, out: Path, max_bytes: int) -> str:
    """Trials ranked by the objective, hyperparameters against it, final grids, curves and config differences."""
    objective = objective_of(runs)
    runs = rank(runs, objective)
    differ, same = config_differences(runs)
    hyper = [k for k in differ if not k.startswith(BOOKKEEPING)]
    direction = "lower is better" if objective and objective_is_lower(runs, objective) else "higher is better"
    best = objective_value(runs[0], objective) if objective else None
    kind = "sweep" if (root / "multirun.yaml").is_file() else "runs under"  # Hydra writes multirun.yaml in a sweep folder
    header = page.header(f"{kind} {root.name or root}", f"{len(runs)} runs  ·  {root.resolve()}",
                         [("runs", str(len(runs))), ("objective", f"{objective or '?'} ({direction})"),
                          ("best", f"{page.fmt(best)} · {runs[0].name}" if best is not None else "?")])
    sections = [page.section("Trials", _trials_table(runs, objective, hyper), "trials")]
    parcoords = parallel_coordinates(runs, hyper, objective) if objective else None
    if parcoords:
        sections.append(page.section("Hyperparameters against the objective",
                                     page.figures_html([parcoords], "parcoords", wide=True) +
                                     '<p class="note">Drag along an axis to pick a range of trials.</p>', "parcoords"))
    finals = [(d, d.grids[-1]) for d in runs if d.grids]
    images = page.Images([p for _, (_, p) in finals], out, max_bytes)
    cards = "".join(f'<div class="trial"><img alt="{page.esc(d.name)}" src="{page.esc(images.src(p))}">'
                    f"<b>{page.esc(d.name)}</b><br>{page.esc(objective or '')} {page.esc(page.fmt(objective_value(d, objective)))}"
                    f"<br>{page.esc(_step_label(step))}</div>" for d, (step, p) in finals)
    sections.append(page.section("Final samples, best first",
                                 images.notice() + (f'<div class="trials">{cards}</div>' if cards else
                                                    '<p class="note">No sample grids in these runs.</p>'), "grids"))
    keys = sorted({k for d in runs for k in d.series if k in loss_keys([d]) or k == objective})
    if keys:
        sections.append(page.section("Curves", page.curve_controls() +
                                     page.figures_html(trial_curves(runs, keys), "curves"), "curves"))
    sections.append(page.section("Config differences", _differences_table(runs, differ, same), "config"))
    return page.document(f"genlab report: {root}", header, sections)


def _trials_table(runs: list[RunData], objective: str | None, hyper: list[str]) -> str:
    metric_keys = sorted({k for d in runs for k, v in d.info.get("metrics", {}).items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "seconds", objective)
                          and not k.startswith(("lr_", "grad_norm_"))})
    shown_hyper = hyper[:12]
    headers = ["#", "trial", "status", "steps", *([objective] if objective else []), *shown_hyper, *metric_keys]
    rows = []
    for i, d in enumerate(runs, 1):
        flat, metrics = flatten(d.config), d.info.get("metrics", {})
        rows.append([i, d.name, d.status.get("status"), d.info.get("step", 0),
                     *([objective_value(d, objective)] if objective else []),
                     *[_cell(flat.get(k)) for k in shown_hyper], *[metrics.get(k) for k in metric_keys]])
    best = ["best" if i == 0 and objective and objective_value(runs[0], objective) is not None else ""
            for i in range(len(runs))]
    more = f" ({len(hyper) - 12} more differing keys below)" if len(hyper) > 12 else ""
    return (page.table(headers, rows, sortable=True, row_classes=best) +
            f'<p class="note">Click a column to sort by it. Metrics: the last logged value, eval/metrics.json, '
            f"and best_* from evaluations during training{more}.</p>")


def _cell(value: Any) -> Any:
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def _differences_table(runs: list[RunData], differ: list[str], same: int) -> str:
    if not differ:
        return f'<p class="note">All {same} config keys are the same in every run.</p>'
    flats = [flatten(d.config) for d in runs]
    rows = [[k, *[_cell(f.get(k, "(absent)")) for f in flats]] for k in differ]
    return (page.table(["key", *[d.name for d in runs]], rows) +
            f'<p class="note">{len(differ)} of {len(differ) + same} keys differ; the others are the same in every run.</p>')
