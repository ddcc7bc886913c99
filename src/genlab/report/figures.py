"""The report's charts as Plotly figures (JSON); report.js draws them and adds smoothing and log scale.

Plotly because one library gives everything the page needs offline: zoom and hover on
curves, a log axis and restyling from a few lines of JS, and a parallel-coordinates chart
with brushing for sweeps. Its JS (about 5 MB) is inlined once per page.
"""

from __future__ import annotations

from typing import Any

from genlab.report.collect import RunData, flatten, objective_is_lower, objective_value

#: Axes in the parallel-coordinates chart at most (hyperparameters; the objective comes on top).
MAX_AXES = 8


def panels_of(keys: list[str], losses: tuple[str, ...] | list[str] = ()) -> list[tuple[str, list[str]]]:
    """Group logged keys into charts: all `losses` (the run's, see `collect.loss_keys`) together, learning rates,
    gradient norms, images/s, then one per key."""
    groups = [("losses", [k for k in keys if k in losses]),
              ("learning rate", [k for k in keys if k.startswith("lr_")]),
              ("gradient norm", [k for k in keys if k.startswith("grad_norm_")]),
              ("images/s", [k for k in keys if k == "images_per_s"])]
    taken = {k for _, group in groups for k in group}
    groups += [(k, [k]) for k in keys if k not in taken]
    return [(title, group) for title, group in groups if group]


def _layout(title: str, ytitle: str = "") -> dict[str, Any]:
    return {"title": {"text": title, "font": {"size": 14}}, "height": 300, "margin": {"l": 55, "r": 15, "t": 40, "b": 40},
            "xaxis": {"title": {"text": "optimizer step"}},
            "yaxis": {"title": {"text": ytitle}, "tickformat": ".3~g"},  # no 199.99999u from float noise
            "legend": {"orientation": "h", "y": -0.25}, "hovermode": "x unified", "template": "plotly_white"}


def run_curves(data: RunData) -> list[dict[str, Any]]:
    """One figure per panel of a run's logged keys (each key one line)."""
    import plotly.graph_objects as go

    figures = []
    for title, keys in panels_of(list(data.series), data.info.get("loss_keys", ())):
        fig = go.Figure(layout=_layout(title))
        for key in keys:
            steps, values = data.series[key]
            fig.add_trace(go.Scatter(x=steps, y=values, name=key, mode="lines"))
        figures.append(fig.to_plotly_json())
    return figures


def trial_curves(runs: list[RunData], keys: list[str]) -> list[dict[str, Any]]:
    """One figure per key, one line per trial."""
    import plotly.graph_objects as go

    figures = []
    for key in keys:
        fig = go.Figure(layout=_layout(key))
        for data in runs:
            if key in data.series:
                steps, values = data.series[key]
                fig.add_trace(go.Scatter(x=steps, y=values, name=data.name, mode="lines"))
        if fig.data:
            figures.append(fig.to_plotly_json())
    return figures


def _axis(label: str, values: list[Any]) -> dict[str, Any]:
    """A parcoords dimension: numbers as they are, anything else as categories in sorted order."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return {"label": label, "values": [float(v) for v in values]}
    names = sorted({str(v) for v in values})
    return {"label": label, "values": [names.index(str(v)) for v in values],
            "tickvals": list(range(len(names))), "ticktext": names}


def parallel_coordinates(runs: list[RunData], hyperparameters: list[str], objective: str) -> dict[str, Any] | None:
    """Hyperparameters (the config keys that differ) against the objective, one line per trial; None if < 2 trials."""
    import plotly.graph_objects as go

    scored = [d for d in runs if objective_value(d, objective) is not None]
    if len(scored) < 2 or not hyperparameters:
        return None
    flats = [flatten(d.config) for d in scored]
    # The keys most trials have come first; list-valued keys (architectures) last.
    keys = sorted(hyperparameters, key=lambda k: (sum(k not in f for f in flats),
                                                  any(isinstance(f.get(k), list) for f in flats)))[:MAX_AXES]
    score = [objective_value(d, objective) for d in scored]
    dimensions = [_axis(k, [f.get(k) for f in flats]) for k in keys] + [{"label": objective, "values": score}]
    line = {"color": score, "colorscale": "Viridis", "reversescale": objective_is_lower(scored, objective), "showscale": True,
            "colorbar": {"title": {"text": objective}}}
    fig = go.Figure(go.Parcoords(line=line, dimensions=dimensions),
                    layout={"height": 380, "margin": {"l": 80, "r": 80, "t": 60, "b": 30}, "template": "plotly_white"})
    return fig.to_plotly_json()
