"""The `folio plot --html` page: one self-contained file (inline SVG drawn by a little vanilla
JavaScript, no network, no CDN) with hover read-outs and click-to-hide runs.
"""

from __future__ import annotations

import html
import json
import math
import re

import numpy as np

from folio.watch.chart import LOG_TICKS, Chart


def _points(*columns: np.ndarray) -> list[list[float | None]]:
    """Rows of [x, y, ...] with NaN/inf as null (JSON has no NaN)."""
    return [[v if math.isfinite(v) else None for v in map(float, row)]
            for row in zip(*columns, strict=True)]


def chart_data(chart: Chart) -> dict:
    """The chart as plain JSON data: exactly the series the PNG draws."""
    return {
        "title": chart.title, "xLabel": chart.x_label, "yLabel": chart.y_label,
        "metric": chart.word, "logy": chart.logy,
        "smooth": chart.smooth, "logTicks": LOG_TICKS,
        "runs": [{"name": c.label, "color": c.color,
                  "train": _points(c.train_x, c.train_y, c.smooth_y),
                  "eval": _points(c.eval_x, c.eval_y, c.eval_iter, c.eval_train_y)}
                 for c in chart.runs],
    }


def fill(template: str, **values: str) -> str:
    """`template` with each %KEY% replaced in one pass (inserted text is never rescanned)."""
    return re.sub(r"%([A-Z]+)%", lambda m: values.get(m[1], m[0]), template)


def chart_block(chart: Chart, prefix: str = "") -> str:
    """One chart as an HTML fragment (title, legend, SVG, hint, its data); its element ids
    start with `prefix`, so a page can hold several. The page needs CHART_STYLE and
    CHART_SCRIPT, then a `folioChart(prefix)` call per chart."""
    # "</" cannot appear inside the inline script, whatever a run is called.
    data = json.dumps(chart_data(chart), separators=(",", ":")).replace("</", "<\\/")
    return fill(BLOCK, METRIC=chart.word, DATA=data, P=prefix)


def render_html(chart: Chart) -> str:
    """The `folio plot --html` page: one chart."""
    return page(chart.title, PLOT_STYLE + CHART_STYLE, chart_block(chart),
                CHART_SCRIPT + 'folioChart("");\n')


CHART_STYLE = """  .folio-chart h1 { font-size: 17px; font-weight: 600; margin: 0 0 8px; }
  .folio-chart .wrap { position: relative; max-width: 1100px; }
  .folio-chart svg { width: 100%; height: auto; display: block; }
  .folio-chart .axis text { font-size: 12px; fill: #444; }
  .folio-chart .grid line { stroke: #e5e5e5; }
  .folio-chart .tip { position: absolute; pointer-events: none; background: rgba(255,255,255,.95);
         border: 1px solid #bbb; border-radius: 4px; padding: 6px 8px; font-size: 12px;
         white-space: nowrap; display: none; box-shadow: 0 1px 4px rgba(0,0,0,.15); }
  .folio-chart .legend span { display: inline-block; margin-right: 16px; cursor: pointer;
                              user-select: none; }
  .folio-chart .legend span.off { opacity: .35; }
  .folio-chart .legend i { display: inline-block; width: 18px; height: 3px;
                           vertical-align: middle; margin-right: 6px; }
  .folio-chart .hint { color: #777; font-size: 12px; }
"""

BLOCK = """<div class="folio-chart">
<h1 id="%P%title"></h1>
<div id="%P%legend" class="legend"></div>
<div id="%P%wrap" class="wrap"><svg id="%P%chart" viewBox="0 0 1000 560"></svg>\
<div id="%P%tip" class="tip"></div></div>
<p class="hint">Faint line: train %METRIC% at each point; bold: its moving
average (EMA <span id="%P%span"></span>); circles: val %METRIC% at each
evaluation. Hover for values, click a legend entry to hide a run.</p>
<script id="%P%folio-data" type="application/json">%DATA%</script>
</div>"""

CHART_SCRIPT = """function folioChart(P) {  // P: the prefix of the chart's element ids
  const byId = id => document.getElementById(P + id);
  const D = JSON.parse(byId("folio-data").textContent);
  const W = 1000, H = 560, M = {l: 70, r: 20, t: 16, b: 52};
  const NS = "http://www.w3.org/2000/svg";
  const svg = byId("chart"), tip = byId("tip");
  const hidden = new Set();
  byId("title").textContent = D.title;
  byId("span").textContent = D.smooth;

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    (parent || svg).appendChild(e);
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toPrecision(3) + "G";
    if (a >= 1e6) return (v / 1e6).toPrecision(3) + "M";
    if (a >= 1e4) return (v / 1e3).toPrecision(3) + "k";
    return Number.isInteger(v) ? String(v) : String(+v.toPrecision(4));  // 0.5, not 0.5000
  }
  function niceTicks(lo, hi, n) {
    const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const f = step0 / mag, step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step)
      out.push(+v.toPrecision(12));
    return out;
  }
  function logTicks(lo, hi) {
    const out = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++)
      for (const m of D.logTicks)
        { const v = m * Math.pow(10, e); if (v >= lo && v <= hi) out.push(+v.toPrecision(6)); }
    return out;
  }
  function extent(vals, log) {  // [min, max] of the finite values (positive ones on a log axis)
    let lo = Infinity, hi = -Infinity;
    for (const v of vals) {
      if (v === null || !isFinite(v) || (log && v <= 0)) continue;
      lo = Math.min(lo, v); hi = Math.max(hi, v);
    }
    if (lo === Infinity) return log ? [1, 10] : [0, 1];
    if (lo === hi) return log ? [lo / 1.1, hi * 1.1] : [lo - 0.5, hi + 0.5];
    return [lo, hi];
  }

  let sx, sy, ix;
  function draw() {
    svg.textContent = "";
    const runs = D.runs.filter(r => !hidden.has(r.name));
    const xs = [], ys = [];
    for (const r of runs) {
      for (const p of r.train) { xs.push(p[0]); ys.push(p[1]); }
      for (const p of r.eval) { xs.push(p[0]); ys.push(p[1]); }
    }
    let [x0, x1] = extent(xs, false), [y0, y1] = extent(ys, D.logy);
    if (D.logy) { y0 /= 1.03; y1 *= 1.03; }
    else { const pad = (y1 - y0) * 0.04; y0 -= pad; y1 += pad; }
    const pw = W - M.l - M.r, ph = H - M.t - M.b;
    sx = v => M.l + (v - x0) / (x1 - x0 || 1) * pw;
    ix = px => x0 + (px - M.l) / pw * (x1 - x0);
    sy = D.logy ? v => M.t + (1 - (Math.log(v) - Math.log(y0)) / (Math.log(y1) - Math.log(y0))) * ph
                : v => M.t + (1 - (v - y0) / (y1 - y0)) * ph;
    const grid = el("g", {class: "grid"}), axis = el("g", {class: "axis"});
    for (const t of niceTicks(x0, x1, 8)) {
      el("line", {x1: sx(t), x2: sx(t), y1: M.t, y2: M.t + ph}, grid);
      el("text", {x: sx(t), y: M.t + ph + 18, "text-anchor": "middle"}, axis).textContent = fmt(t);
    }
    for (const t of (D.logy ? logTicks(y0, y1) : niceTicks(y0, y1, 7))) {
      el("line", {x1: M.l, x2: M.l + pw, y1: sy(t), y2: sy(t)}, grid);
      el("text", {x: M.l - 8, y: sy(t) + 4, "text-anchor": "end"}, axis).textContent = fmt(t);
    }
    el("rect", {x: M.l, y: M.t, width: pw, height: ph, fill: "none", stroke: "#999"});
    el("text", {x: M.l + pw / 2, y: H - 10, "text-anchor": "middle"}, axis).textContent = D.xLabel;
    el("text", {transform: `translate(18 ${M.t + ph / 2}) rotate(-90)`, "text-anchor": "middle"},
       axis).textContent = D.yLabel + (D.logy ? ", log scale" : "");
    const clip = el("clipPath", {id: P + "plotarea"}, el("defs", {}));
    el("rect", {x: M.l, y: M.t, width: pw, height: ph}, clip);
    const g = el("g", {"clip-path": `url(#${P}plotarea)`});
    const path = (pts, k) => {
      let d = "", pen = "M";
      for (const p of pts) {
        if (p[k] === null || (D.logy && p[k] <= 0)) { pen = "M"; continue; }
        d += pen + sx(p[0]).toFixed(1) + " " + sy(p[k]).toFixed(1); pen = "L";
      }
      return d;
    };
    for (const r of runs) {
      const line = {fill: "none", stroke: r.color};
      el("path", {...line, d: path(r.train, 1), "stroke-opacity": 0.25, "stroke-width": 1}, g);
      el("path", {...line, d: path(r.train, 2), "stroke-width": 2.2}, g);
      const valColor = D.runs.length === 1 ? "#d62728" : r.color;
      el("path", {...line, d: path(r.eval, 1), stroke: valColor, "stroke-dasharray": "2 3"}, g);
      for (const p of r.eval) {
        if (p[1] === null) continue;
        el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 4.5, fill: "white", stroke: valColor,
                      "stroke-width": 1.8}, g);
      }
    }
    el("line", {id: P + "cursor", y1: M.t, y2: M.t + ph, stroke: "#888", "stroke-dasharray": "3 3",
                visibility: "hidden"});
    el("g", {id: P + "dots"});
    el("rect", {id: P + "hit", x: M.l, y: M.t, width: pw, height: ph, fill: "transparent"});
    const hit = byId("hit");
    hit.addEventListener("mousemove", hover);
    hit.addEventListener("mouseleave", () => {
      tip.style.display = "none";
      byId("cursor").setAttribute("visibility", "hidden");
      byId("dots").textContent = "";
    });
  }

  function nearest(pts, x) {  // pts sorted by x: binary search for the closest point
    let lo = 0, hi = pts.length - 1;
    if (hi < 0) return null;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (pts[mid][0] < x) lo = mid; else hi = mid;
    }
    return Math.abs(pts[lo][0] - x) <= Math.abs(pts[hi][0] - x) ? pts[lo] : pts[hi];
  }

  function hover(ev) {
    const box = svg.getBoundingClientRect(), scale = W / box.width;
    const px = (ev.clientX - box.left) * scale, x = ix(px);
    const cursor = byId("cursor"), dots = byId("dots");
    cursor.setAttribute("x1", px); cursor.setAttribute("x2", px);
    cursor.setAttribute("visibility", "visible");
    dots.textContent = "";
    let rows = "";
    for (const r of D.runs) {
      if (hidden.has(r.name)) continue;
      const t = nearest(r.train, x), e = nearest(r.eval, x);
      rows += `<div><b style="color:${r.color}">${esc(r.name)}</b>`;
      if (t) {
        rows += `<br>${esc(D.xLabel)} ${fmt(t[0])}: train ${D.metric} ${fmt(t[1])}` +
          ` (smoothed ${fmt(t[2])})`;
        if (t[1] !== null) el("circle", {cx: sx(t[0]), cy: sy(t[1]), r: 3, fill: r.color}, dots);
      }
      if (e && Math.abs(sx(e[0]) - px) < 40) {
        rows += `<br>eval at iter ${fmt(e[2])}: val ${D.metric} ${fmt(e[1])}, ` +
          `train ${D.metric} ${fmt(e[3])}`;
        if (e[1] !== null)
          el("circle", {cx: sx(e[0]), cy: sy(e[1]), r: 6, fill: "none", stroke: "#000"}, dots);
      }
      rows += "</div>";
    }
    tip.innerHTML = rows;
    tip.style.display = "block";
    const wrap = byId("wrap").getBoundingClientRect();
    const left = ev.clientX - wrap.left + 14;
    const flip = left + tip.offsetWidth > wrap.width;
    tip.style.left = (flip ? left - tip.offsetWidth - 28 : left) + "px";
    tip.style.top = (ev.clientY - wrap.top + 14) + "px";
  }
  function esc(s) {
    const map = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"};
    return String(s).replace(/[&<>"]/g, c => map[c]);
  }

  const legend = byId("legend");
  for (const r of D.runs) {
    const s = document.createElement("span");
    s.innerHTML = `<i style="background:${r.color}"></i>${esc(r.name)}`;
    s.title = "click to hide or show";
    s.addEventListener("click", () => {
      hidden.has(r.name) ? hidden.delete(r.name) : hidden.add(r.name);
      s.classList.toggle("off");
      draw();
    });
    legend.appendChild(s);
  }
  draw();
}
"""

PLOT_STYLE = "  body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }\n"

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
%STYLE%</style>
</head>
<body>
%BODY%
<script>
"use strict";
%SCRIPT%</script>
</body>
</html>
"""


def page(title: str, style: str, body: str, script: str) -> str:
    """A self-contained HTML page (no network): `folio plot --html`'s and the report card's."""
    return fill(PAGE, TITLE=html.escape(title), STYLE=style, BODY=body, SCRIPT=script)
