"""`genlab report`: the HTML of a real tiny run and a 2-trial sweep, drawn by headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest
from conftest import TINY_DDPM, cli, genlab
from PIL import Image

from genlab.report.collect import downsample
from genlab.run_dir import RunDir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                    "(.ci/run installs Debian's `chromium`; `apt-get install chromium` here)")


def browse(page: Path, profile: Path, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """(the DOM after the page's scripts ran, the console messages) of `page` in headless Chromium.

    The software WebGL of a GPU-less Chromium reports "GL Driver Message" performance notes
    through the console; they come from the browser, not the page, and are left out.
    """
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000",
            "--hide-scrollbars", "--window-size=1400,2400"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    result = subprocess.run([*args, page.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line and "GL Driver Message" not in line]
    return result.stdout, console


HARNESS = """<!DOCTYPE html><html><body><pre id="out">not run</pre>
<iframe id="page" src="%s" style="width:1400px;height:2000px"></iframe>
<script>
const frame = document.getElementById("page");
const settle = () => new Promise((resolve) => setTimeout(resolve, 1000));
frame.onload = () => {
  const d = frame.contentDocument;
  const wait = () => (d.body.dataset.ready === "1" ? act(d).then((r) => {
    document.getElementById("out").textContent = JSON.stringify(r); }) : setTimeout(wait, 50));
  wait();
};
async function act(d) { %s }
</script></body></html>"""


def operate(page: Path, profile: Path, actions: str) -> dict:
    """Run `actions` (the body of an async JS function of the page's document `d`) on the drawn page; its result.

    The page is loaded in an iframe of a harness beside it (--allow-file-access-from-files lets
    the harness reach into it), so the test clicks and drags as a person would.
    """
    harness = page.with_name("harness.html")
    harness.write_text(HARNESS % (page.name, actions))
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
            "--allow-file-access-from-files", f"--user-data-dir={profile}", "--virtual-time-budget=30000",
            "--window-size=1400,2400", "--dump-dom", harness.resolve().as_uri()]
    dom = subprocess.run(args, capture_output=True, text=True, timeout=180).stdout
    harness.unlink()
    return json.loads(unescape(re.search(r'<pre id="out">(.*?)</pre>', dom, re.S).group(1)))


def scripts(html: str, **attrs: str) -> list:
    """The JSON data blocks of the page with these attributes (figures, the grid list)."""
    found = []
    for match in re.finditer(r'<script type="application/json"([^>]*)>(.*?)</script>', html, re.S):
        if all(f'{k.replace("_", "-")}="{v}"' in match.group(1) for k, v in attrs.items()):
            found.append(json.loads(match.group(2).replace("<\\/", "</")))
    return found


def assert_self_contained(html: str) -> None:
    """Nothing to fetch: no external script, stylesheet or image."""
    assert not re.search(r'<(script|link|img)[^>]*(src|href)="(https?:)?//', html)
    assert "<link" not in html


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multirun") / "sweep"
    genlab("train", "-m", *TINY_DDPM, "trainer.lr=1e-4,3e-3", f"hydra.sweep.dir={folder}")
    return folder


@needs_chromium
def test_run_report_shows_grids_and_curves_in_chromium(tiny_ddpm_run, tmp_path):
    out = tmp_path / "run.html"
    result = cli("report", str(tiny_ddpm_run), "--out", str(out))
    assert "wrote" in result.stdout
    html = out.read_text()
    assert_self_contained(html)

    # The grids over steps, embedded, in order; each is the PNG training wrote.
    run = RunDir(tiny_ddpm_run)
    grids = scripts(html, id="grid-list")[0]
    assert [g["label"] for g in grids] == ["step 2", "step 4", "final"]
    for grid, (_, png) in zip(grids, run.sample_grids()):
        assert base64.b64decode(grid["src"].removeprefix("data:image/png;base64,")) == png.read_bytes()
    # The loss curve holds exactly what metrics.jsonl logged.
    logged = run.read_metrics()
    losses = next(f for f in scripts(html, kind="curves") if f["layout"]["title"]["text"] == "losses")
    assert losses["data"][0]["y"] == [row["loss"] for row in logged]
    assert "genlab train trainer=debug logger=none" in html  # the command that made it

    dom, console = browse(out, tmp_path / "profile")
    assert console == []
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="1"' in body
    assert int(re.search(r'data-charts="(\d+)"', body).group(1)) == len(scripts(html, kind="curves")) >= 3
    assert re.search(r'<img id="grid-image"[^>]*data-loaded="1"', dom)
    shot = tmp_path / "run.png"
    browse(out, tmp_path / "profile2", screenshot=shot)
    assert Image.open(shot).size == (1400, 2400)

    # The controls: the slider picks a grid; smoothing and the log switch restyle the curves.
    result = operate(out, tmp_path / "profile3", """
        const slider = d.getElementById("grid-slider");
        slider.value = "0"; slider.dispatchEvent(new Event("input"));
        const smoothing = d.getElementById("smoothing");
        smoothing.value = "0.9"; smoothing.dispatchEvent(new Event("input"));
        d.getElementById("logscale").click();
        await settle();
        const chart = Array.from(d.querySelectorAll(".chart")).find((c) => c.layout.title.text === "losses");
        return {label: d.getElementById("grid-label").textContent, src: d.getElementById("grid-image").src,
                raw: chart.data[0].y, smooth: chart.data[1].y, axis: chart.layout.yaxis.type};""")
    assert result["label"] == "step 2" and result["src"] == grids[0]["src"]
    raw, expected, ema = result["raw"], [], 0.0
    for i, value in enumerate(raw, 1):  # TensorBoard's debiased exponential moving average
        ema = 0.9 * ema + 0.1 * value
        expected.append(ema / (1 - 0.9 ** i))
    assert raw == [row["loss"] for row in logged] and result["smooth"] == pytest.approx(expected)
    assert result["smooth"] != pytest.approx(raw) and result["axis"] == "log"


@pytest.mark.slow  # a 2-trial sweep, then Chromium (~30 s); `make test-slow` (CI) runs it
@needs_chromium
def test_sweep_report_ranks_trials_and_draws_parallel_coordinates_in_chromium(sweep, tmp_path):
    cli("report", str(sweep))
    out = sweep / "report.html"
    html = out.read_text()
    assert_self_contained(html)
    trials = {t.name: RunDir(t).read_metrics()[-1]["loss"] for t in sweep.iterdir() if RunDir(t).is_run()}
    best_first = sorted(trials, key=trials.get)
    # The trials table (best first) and the final grids in the same order.
    table = html.split('id="trials"')[1].split("</table>")[0]
    assert [name for name in re.findall(r"<td>(\d_ddpm)</td>", table)] == best_first
    cards = re.findall(r'<div class="trial"><img alt="([^"]+)"', html)
    assert cards == best_first
    # Parallel coordinates: trainer.lr (the one key that differs) against the objective, the loss.
    parcoords = scripts(html, kind="parcoords")[0]["data"][0]
    assert [d["label"] for d in parcoords["dimensions"]] == ["trainer.lr", "loss"]
    assert sorted(zip(parcoords["dimensions"][1]["values"], parcoords["dimensions"][0]["values"])) == \
        sorted((trials[name], 1e-4 if name.startswith("0") else 3e-3) for name in trials)
    differences = html.split('id="config"')[1]
    assert "trainer.lr" in differences and "1 of " in differences

    dom, console = browse(out, tmp_path / "profile")
    assert console == []
    assert 'data-ready="1"' in re.search(r"<body[^>]*>", dom).group(0)
    assert len(re.findall(r'<div class="trial"><img[^>]*data-loaded="1"', dom)) == 2
    assert 'class="parcoords"' in dom  # Plotly drew the chart (its own layer's class name)
    browse(out, tmp_path / "profile2", screenshot=tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000

    # A click on a column header sorts the trials by it, a second click reverses.
    result = operate(out, tmp_path / "profile3", """
        const table = d.querySelector("table.sortable");
        const names = () => Array.from(table.tBodies[0].rows).map((row) => row.cells[1].textContent);
        const header = (text) => Array.from(table.querySelectorAll("th")).find((th) => th.textContent === text);
        header("loss").click(); const up = names(); header("loss").click(); const down = names();
        header("trainer.lr").click(); const lr = names();
        return {up, down, lr};""")
    assert result == {"up": best_first, "down": best_first[::-1], "lr": ["0_ddpm", "1_ddpm"]}


def test_large_run_downsamples_curves_and_links_grids(tiny_ddpm_run, tmp_path):
    """5,000 log lines and 200 grids of 30 kB: curves stay at 1,000 points, grids are linked."""
    import numpy as np

    big = tmp_path / "big"
    shutil.copytree(tiny_ddpm_run / ".hydra", big / ".hydra")
    rng = np.random.default_rng(0)
    losses = np.exp(-np.arange(5000) / 1000) + rng.random(5000) * 0.05
    losses[3210] = 9.0  # a spike must survive the downsampling
    (big / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": float(v)}) + "\n"
                                               for i, v in enumerate(losses)))
    (big / "samples").mkdir()
    for step in range(50, 10_001, 50):
        Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(big / "samples" / f"step_{step:06d}.png")
    cli("report", str(big), "--max-embed-mb", "2")
    html = (big / "report.html").read_text()
    assert len(html) < 6e6  # Plotly's JS (~5 MB) and little else
    grids = scripts(html, id="grid-list")[0]
    assert len(grids) == 200 and grids[0]["src"] == "samples/step_000050.png"
    assert "are linked, not embedded" in html
    curve = next(f for f in scripts(html, kind="curves") if f["layout"]["title"]["text"] == "losses")["data"][0]
    assert len(curve["y"]) <= 1000 and max(curve["y"]) == 9.0 and curve["x"][-1] == 5000


def test_downsample_keeps_extremes_and_the_last_point():
    steps = list(range(10_000))
    values = [float((i * 7919) % 1000) for i in steps]
    kept_steps, kept = downsample(steps, values, 200)
    assert len(kept) <= 200 and kept_steps == sorted(kept_steps)
    assert min(kept) == min(values) and max(kept) == max(values) and kept_steps[-1] == 9_999
    assert downsample([1, 2], [3.0, 4.0], 200) == ([1, 2], [3.0, 4.0])


def test_command_shows_overrides_and_resumes(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.path / ".hydra").mkdir(parents=True)
    run.overrides_file.write_text("- model=gan\n- data.path=/my data\n- (resume) trainer.max_steps=900\n")
    run.hydra_file.write_text("hydra:\n  job:\n    name: train\n")
    assert run.command() == ["genlab train model=gan 'data.path=/my data'",
                             f"genlab resume {run.path} trainer.max_steps=900"]


def test_report_of_a_folder_without_runs_says_so(tmp_path):
    result = cli("report", str(tmp_path), check=False)
    assert result.returncode == 1 and "holds no genlab run" in result.stderr and "Traceback" not in result.stderr
