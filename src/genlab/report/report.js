// genlab report: draws the Plotly figures embedded as JSON, and wires the controls.
// Everything is in this one file and the page; nothing is fetched from the network.
"use strict";

// TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0.
function smooth(values, weight) {
  let last = 0, count = 0;
  return values.map((v) => {
    if (!Number.isFinite(v)) return v;
    last = last * weight + (1 - weight) * v;
    count += 1;
    return last / (1 - Math.pow(weight, count));
  });
}

const charts = [];  // {div, raw: [y arrays of the logged traces], n}

function drawFigures() {
  const pending = [];
  document.querySelectorAll("script.figure").forEach((script) => {
    const spec = JSON.parse(script.textContent);
    const div = document.createElement("div");
    div.className = "chart";
    script.parentNode.insertBefore(div, script);
    const config = {responsive: true, displaylogo: false};
    if (script.dataset.kind === "curves") {
      // Each logged line is drawn twice, as TensorBoard does: faint as logged, solid as smoothed.
      const n = spec.data.length;
      const raw = spec.data.map((trace) => trace.y.slice());
      spec.data.forEach((trace, i) => {
        trace.line = Object.assign({}, trace.line, {color: COLORS[i % COLORS.length]});
        trace.opacity = 0.25;
        trace.legendgroup = trace.name;
        trace.showlegend = false;
        trace.hoverinfo = "skip";
      });
      raw.forEach((y, i) => spec.data.push(Object.assign({}, spec.data[i], {
        y: y.slice(), opacity: 1, showlegend: true, hoverinfo: undefined})));
      charts.push({div, raw, n, names: spec.data.slice(0, n).map((trace) => trace.name)});
    }
    pending.push(Plotly.newPlot(div, spec.data, spec.layout, config));
  });
  return Promise.all(pending);
}

const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"];

function restyleCurves() {
  const weight = Number(document.getElementById("smoothing").value);
  const log = document.getElementById("logscale").checked;
  document.getElementById("smoothing-value").textContent = weight.toFixed(2);
  return Promise.all(charts.map(({div, raw, n, names}) => {
    const indices = raw.map((_, i) => n + i);
    // Learning rates are set, not measured: smoothing would only shift the schedule.
    const smoothed = raw.map((y, i) => smooth(y, names[i].startsWith("lr_") ? 0 : weight));
    return Plotly.restyle(div, {y: smoothed}, indices)
      .then(() => Plotly.relayout(div, {"yaxis.type": log ? "log" : "linear"}));
  }));
}

function wireCurveControls() {
  const slider = document.getElementById("smoothing");
  if (!slider) return Promise.resolve();
  slider.addEventListener("input", restyleCurves);
  document.getElementById("logscale").addEventListener("change", restyleCurves);
  return restyleCurves();
}

// The sample grid slider: one <img>, its source switched from the list of grids.
function wireGridSlider() {
  const slider = document.getElementById("grid-slider");
  if (!slider) return;
  const grids = JSON.parse(document.getElementById("grid-list").textContent);
  const img = document.getElementById("grid-image");
  const label = document.getElementById("grid-label");
  const show = () => {
    const grid = grids[Number(slider.value)];
    img.src = grid.src;
    label.textContent = grid.label;
  };
  slider.addEventListener("input", show);
  show();
}

// Sortable tables: a click on a header sorts by that column (numbers as numbers, blanks last).
function wireSortableTables() {
  document.querySelectorAll("table.sortable").forEach((table) => {
    table.querySelectorAll("th").forEach((th, column) => {
      th.addEventListener("click", () => {
        const ascending = th.dataset.order !== "asc";
        table.querySelectorAll("th").forEach((other) => delete other.dataset.order);
        th.dataset.order = ascending ? "asc" : "desc";
        const body = table.tBodies[0];
        const key = (row) => row.cells[column].dataset.value ?? row.cells[column].textContent.trim();
        const rows = Array.from(body.rows);
        rows.sort((a, b) => compareCells(key(a), key(b), ascending));
        rows.forEach((row) => body.appendChild(row));
      });
    });
  });
}

function compareCells(a, b, ascending) {
  if (a === "" || b === "") return (a === "") - (b === "");  // blanks last either way
  const x = Number(a), y = Number(b);
  const order = Number.isFinite(x) && Number.isFinite(y) ? x - y : a.localeCompare(b);
  return ascending ? order : -order;
}

// Tests and people can tell the page finished drawing: <body data-ready="1" data-charts="N">.
function markImagesLoaded() {
  document.querySelectorAll("img").forEach((img) => {
    const mark = () => { img.dataset.loaded = img.naturalWidth > 0 ? "1" : "0"; };
    if (img.complete) mark(); else img.addEventListener("load", mark);
    img.addEventListener("error", () => { img.dataset.loaded = "0"; });
  });
}

window.addEventListener("DOMContentLoaded", () => {
  wireGridSlider();
  wireSortableTables();
  drawFigures().then(wireCurveControls).then(() => {
    markImagesLoaded();
    const drawn = Array.from(document.querySelectorAll(".chart")).filter((div) => div.querySelector(".main-svg"));
    document.body.dataset.charts = String(drawn.length);
    document.body.dataset.ready = "1";
  });
});
