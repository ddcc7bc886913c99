"""HTML of the report pages: one file with Plotly's JS, the page's CSS and JS and the data inlined.

Sample grids are embedded as data URIs while they fit in `max_embed_bytes`; past that every
grid is linked by a path relative to the report, so that a run with hundreds of large grids
still gives a page of a few MB (then the page needs the run folder beside it, and says so).
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Iterable

ASSETS = Path(__file__).parent


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Numbers to 4 significant digits; anything else as text; None as blank."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Images:
    """Decides once whether a page's images are embedded (data URIs) or linked (relative paths)."""

    def __init__(self, paths: Iterable[Path], out: Path, max_bytes: int):
        self.paths = list(dict.fromkeys(paths))
        self.out_dir = out.parent
        self.total = sum(p.stat().st_size for p in self.paths if p.is_file())
        self.embed = self.total <= max_bytes

    def src(self, path: Path) -> str:
        if self.embed:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        return Path(os.path.relpath(path.resolve(), self.out_dir.resolve())).as_posix()

    def notice(self) -> str:
        if self.embed or not self.paths:
            return ""
        return (f'<p class="warn">The {len(self.paths)} sample grids ({self.total / 1e6:.1f} MB) are linked, not embedded, '
                "to keep this page small: keep it where it is, beside the run folders (or raise --max-embed-mb).</p>")


def json_script(data: Any, element_id: str = "", css_class: str = "", kind: str = "") -> str:
    """Data for report.js in a <script type="application/json"> (safe against a "</script>" inside)."""
    from plotly.io.json import to_json_plotly

    text = to_json_plotly(data).replace("</", "<\\/")
    attrs = "".join(f' {name}="{esc(value)}"' for name, value in
                    (("id", element_id), ("class", css_class), ("data-kind", kind)) if value)
    return f'<script type="application/json"{attrs}>{text}</script>'


def figures_html(figures: list[dict[str, Any]], kind: str, wide: bool = False) -> str:
    return f'<div class="charts{" wide" if wide else ""}">' + "".join(f"<div>{json_script(f, css_class='figure', kind=kind)}</div>"
                                            for f in figures) + "</div>"


def curve_controls() -> str:
    return ('<div class="controls"><label>smoothing <input type="range" id="smoothing" min="0" max="0.99" '
            'step="0.01" value="0.6"> <span id="smoothing-value"></span></label>'
            '<label><input type="checkbox" id="logscale"> log scale</label>'
            '<span class="note">faint: as logged; solid: smoothed (exponential moving average)</span></div>')


def table(headers: list[str], rows: list[list[Any]], sortable: bool = False, row_classes: list[str] | None = None,
          cell_classes: list[list[str]] | None = None) -> str:
    """A table; numeric cells are right-aligned and carry their exact value for sorting."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, value in enumerate(row):
            classes = [*(cell_classes[i][j].split() if cell_classes and cell_classes[i][j] else [])]
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            classes += ["num"] if numeric else []
            attrs = f' class="{" ".join(classes)}"' if classes else ""
            attrs += f' data-value="{value!r}"' if numeric else ""
            cells.append(f"<td{attrs}>{esc(fmt(value))}</td>")
        row_class = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    sort = ' class="sortable"' if sortable else ""
    return f"<table{sort}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(title: str, body: str, section_id: str = "") -> str:
    sid = f' id="{esc(section_id)}"' if section_id else ""
    return f"<section{sid}><h2>{esc(title)}</h2>{body}</section>"


def document(title: str, header: str, sections: list[str]) -> str:
    """The whole page: Plotly's JS, report.css and report.js inlined; no network needed to open it."""
    from plotly.offline import get_plotlyjs

    css = (ASSETS / "report.css").read_text()
    script = (ASSETS / "report.js").read_text()
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{css}</style>"
            f"<script>{get_plotlyjs()}</script></head>\n<body>{header}<main>{''.join(sections)}</main>"
            f"<script>{script}</script></body></html>\n")


def header(title: str, subtitle: str, facts: list[tuple[str, str]], status: str | None = None) -> str:
    badge = f' <span class="badge {esc(status)}">{esc(status)}</span>' if status else ""
    items = "".join(f"<div><b>{esc(value)}</b>{esc(name)}</div>" for name, value in facts)
    return (f"<header><h1>{esc(title)}{badge}</h1><div class=\"sub\">{esc(subtitle)}</div>"
            f"<div class=\"facts\">{items}</div></header>")


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def grid_slider(grids: list[tuple[str, str]]) -> str:
    """The grid viewer: one image, a slider over `grids` [(label, src)]; the last grid shows first."""
    listing = json_script([{"label": label, "src": src} for label, src in grids], element_id="grid-list")
    last = len(grids) - 1
    return (f'<div class="grid-viewer"><img id="grid-image" alt="sample grid" src="{esc(grids[-1][1])}">'
            f'<div class="grid-controls"><div id="grid-label">{esc(grids[-1][0])}</div>'
            f'<input type="range" id="grid-slider" min="0" max="{last}" value="{last}" step="1">'
            f'<p class="note">{len(grids)} grids from the same fixed noise (EMA weights when the run has them): '
            "drag to watch training progress.</p></div></div>" + listing)


def config_yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
