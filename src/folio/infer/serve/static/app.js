// folio serve page: the runs table, live loss curves (from each run's metrics.jsonl, read
// incrementally by byte offset) and a playground that streams from /v1/completions (a chat
// run: /v1/chat/completions, the prompt as a user turn).
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
                "#e377c2"];
const state = { runs: [], selected: new Set(), metrics: {}, firstLoad: true, controller: null };

// ------------------------------------------------------------------ requests

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = localStorage.getItem("folio-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function getJSON(url) {
  const r = await fetch(url, { headers: headers() });
  if (r.status === 401) { $("keybox").hidden = false; throw new Error("API key required"); }
  if (!r.ok) throw new Error(url + ": HTTP " + r.status);
  return r.json();
}

$("key").value = localStorage.getItem("folio-key") || "";
$("key").addEventListener("change", () => {
  localStorage.setItem("folio-key", $("key").value);
  refreshRuns();
});

// ------------------------------------------------------------------ runs

function fmt(x, digits) { return typeof x === "number" ? x.toFixed(digits) : "–"; }

function shape(m) {
  if (!m) return "–";
  return `${m.n_layer}L · ${m.n_head}H · ${m.n_embd}d · block ${m.block_size} · vocab ${m.vocab_size}`;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function renderRuns() {
  const body = $("runs").querySelector("tbody");
  body.replaceChildren();
  $("noruns").hidden = state.runs.length > 0;
  state.runs.forEach((run) => {
    const tr = el("tr");
    tr.dataset.run = run.name;
    const box = el("input");
    box.type = "checkbox";
    box.checked = state.selected.has(run.name);
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(run.name); else state.selected.delete(run.name);
      renderCompare();
      refreshMetrics();
    });
    const td0 = el("td"); td0.append(box); tr.append(td0);
    const name = el("td"); name.append(el("b", run.name));
    if (!run.error) {
      name.append(" ");
      name.append(reportLink("card", [run.name]));
    }
    if (run.error) { name.append(el("br")); name.append(el("span", run.error, "error")); }
    tr.append(name);
    const st = el("td"); st.append(el("span", run.status, "status " + run.status)); tr.append(st);
    tr.append(el("td", shape(run.model)));
    tr.append(el("td", run.dataset || "–"));
    tr.append(el("td", run.iter === undefined ? "–" : `${run.iter}/${run.max_iters}`, "num"));
    tr.append(el("td", fmt(run.best_val_loss, 4), "num"));
    tr.append(el("td", fmt(run.best_val_bpb, 4), "num"));
    const cfg = el("td");
    if (run.config) {
      const d = el("details"); d.append(el("summary", "show"));
      d.append(el("pre", Object.entries(run.config).map(([k, v]) =>
        `${k} = ${JSON.stringify(v)}`).join("\n")));
      cfg.append(d);
    }
    tr.append(cfg);
    body.append(tr);
  });
  renderCompare();
  const select = $("model");
  const current = select.value;
  select.replaceChildren();
  state.runs.filter((r) => !r.error).forEach((r) => select.append(el("option", r.name)));
  if (current) select.value = current;
}

// The report card of some runs (several: compared), in a new tab; with an API key it is
// fetched with the key and opened from memory.
function reportUrl(names) {
  if (names.length === 1) return `/api/runs/${encodeURIComponent(names[0])}/report`;
  return "/api/report?" + names.map((n) => "run=" + encodeURIComponent(n)).join("&");
}

function reportLink(text, names) {
  const a = el("a", text, "report");
  a.href = reportUrl(names);
  a.target = "_blank";
  a.addEventListener("click", async (ev) => {
    if (!localStorage.getItem("folio-key")) return;
    ev.preventDefault();
    const r = await fetch(a.href, { headers: headers() });
    const page = await r.text();
    window.open(URL.createObjectURL(new Blob([page], { type: r.ok ? "text/html" : "text/plain" })));
  });
  return a;
}

function renderCompare() {
  const names = [...state.selected].filter((n) => state.runs.some((r) => r.name === n));
  const box = $("compare");
  box.replaceChildren();
  if (names.length > 1) box.append(reportLink(`compare the ${names.length} ticked runs`, names));
}

async function refreshRuns() {
  try {
    const data = await getJSON("/api/runs");
    state.runs = data.runs;
    if (state.firstLoad) {
      state.runs.slice(0, 6).forEach((r) => state.selected.add(r.name));
      state.firstLoad = false;
    }
    renderRuns();
    refreshMetrics();
    const load = await getJSON("/api/status");
    $("load").textContent = `${load.active} generating, ${load.waiting} waiting · loaded: ` +
      (load.loaded.join(", ") || "none");
  } catch (e) { $("load").textContent = String(e.message || e); }
}

// ------------------------------------------------------------------ metrics

async function refreshMetrics() {
  if (state.reading) return;  // one reader at a time: offsets must not race
  state.reading = true;
  try { await readMetrics(); } finally { state.reading = false; }
  draw();
}

async function readMetrics() {
  for (const name of state.selected) {
    const m = state.metrics[name] || (state.metrics[name] = { offset: 0, train: [], eval: [] });
    try {
      const data = await getJSON(`/api/runs/${encodeURIComponent(name)}/metrics?offset=${m.offset}`);
      if (data.reset) { m.train = []; m.eval = []; }
      data.rows.forEach((row) => (row.kind === "train" ? m.train : m.eval).push(row));
      m.offset = data.offset;
    } catch (e) { /* a run being written: try again next time */ }
  }
}

function smooth(points, alpha) {
  let last = null;
  return points.map(([x, y]) => {
    last = last === null ? y : alpha * last + (1 - alpha) * y;
    return [x, last];
  });
}

function series() {
  const out = [];
  const alpha = parseFloat($("smooth").value);
  [...state.selected].forEach((name, i) => {
    const m = state.metrics[name];
    if (!m) return;
    const color = COLORS[state.runs.findIndex((r) => r.name === name) % COLORS.length] ||
      COLORS[i % COLORS.length];
    const ok = (y) => typeof y === "number" && isFinite(y) && y > 0;
    if ($("showtrain").checked) {
      const pts = m.train.filter((r) => ok(r.loss)).map((r) => [r.iter, r.loss]);
      out.push({ name: name + " train", color, points: smooth(pts, alpha), dash: [] });
    }
    if ($("showval").checked) {
      const pts = m.eval.filter((r) => ok(r.val_loss)).map((r) => [r.iter, r.val_loss]);
      out.push({ name: name + " val", color, points: pts, dash: [6, 4], dots: true });
    }
  });
  return out.filter((s) => s.points.length);
}

function ticks(lo, hi, n) {
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n || 1)));
  const mult = [1, 2, 5, 10].find((k) => (hi - lo) / (step * k) <= n) || 10;
  const s = step * mult;
  const out = [];
  for (let v = Math.ceil(lo / s) * s; v <= hi + 1e-9; v += s) out.push(v);
  return out;
}

function draw() {
  const canvas = $("chart");
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth, H = canvas.clientHeight;
  canvas.width = W * dpr; canvas.height = H * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, W, H);
  const all = series();
  const n = all.reduce((k, s) => k + s.points.length, 0);
  canvas.dataset.points = String(n);
  const legend = $("legend");
  legend.replaceChildren();
  all.forEach((s) => {
    const item = el("span"); const sw = el("i"); sw.style.background = s.color;
    if (s.dash.length) sw.style.opacity = "0.6";
    item.append(sw, document.createTextNode(s.name)); legend.append(item);
  });
  g.font = "12px system-ui, sans-serif";
  g.fillStyle = "#777";
  if (!n) { g.fillText("no loss values yet for the selected runs", 60, H / 2); return; }
  const logy = $("logy").checked;
  const xs = all.flatMap((s) => s.points.map((p) => p[0]));
  const ys = all.flatMap((s) => s.points.map((p) => p[1]));
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 === x0) x1 = x0 + 1;
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 === y0) { y0 *= 0.9; y1 *= 1.1; }
  const f = logy ? Math.log10 : (v) => v;
  const L = 56, R = 12, T = 10, B = 30;
  const px = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const py = (y) => T + (f(y1) - f(y)) / (f(y1) - f(y0)) * (H - T - B);
  g.strokeStyle = "#e6e6e6"; g.lineWidth = 1;
  let yt = ticks(y0, y1, 6);
  if (yt.length < 2) yt = [y0, y1];
  yt.forEach((v) => {
    g.beginPath(); g.moveTo(L, py(v)); g.lineTo(W - R, py(v)); g.stroke();
    g.fillText(v.toPrecision(3), 4, py(v) + 4);
  });
  ticks(x0, x1, 8).forEach((v) => {
    g.beginPath(); g.moveTo(px(v), T); g.lineTo(px(v), H - B); g.stroke();
    g.fillText(String(Math.round(v)), px(v) - 10, H - B + 16);
  });
  g.fillText("iter", W - R - 24, H - 4);
  all.forEach((s) => {
    g.strokeStyle = s.color; g.fillStyle = s.color; g.setLineDash(s.dash);
    g.lineWidth = s.dash.length ? 2 : 1.5;
    g.beginPath();
    s.points.forEach(([x, y], i) => (i ? g.lineTo(px(x), py(y)) : g.moveTo(px(x), py(y))));
    g.stroke();
    g.setLineDash([]);
    if (s.dots) s.points.forEach(([x, y]) => {
      g.beginPath(); g.arc(px(x), py(y), 2.5, 0, 7); g.fill();
    });
  });
}

["logy", "showtrain", "showval", "smooth"].forEach((id) => $(id).addEventListener("input", () => {
  $("smoothval").textContent = parseFloat($("smooth").value).toFixed(2);
  draw();
}));
window.addEventListener("resize", draw);

// ------------------------------------------------------------------ playground

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function generate() {
  const out = $("out-text"), output = $("output");
  $("out-prompt").textContent = $("prompt").value;
  out.textContent = "";
  output.dataset.chunks = "0";
  output.dataset.done = "false";
  const stop = $("stop").value.split("\n").filter((s) => s).map((s) => s.replace(/\\n/g, "\n"));
  const body = { model: $("model").value, prompt: $("prompt").value, stream: true,
                 max_tokens: number("max_tokens"), temperature: number("temperature"),
                 top_k: number("top_k"), top_p: number("top_p"), seed: number("seed"),
                 stream_options: { include_usage: true } };
  if (stop.length) body.stop = stop;
  // a run finetuned with --task=chat answers the prompt as a user turn, in its chat template
  const run = state.runs.find((r) => r.name === body.model);
  const chat = Boolean(run && run.chat);
  if (chat) { body.messages = [{ role: "user", content: body.prompt }]; delete body.prompt; }
  state.controller = new AbortController();
  $("generate").disabled = true; $("stopbtn").disabled = false;
  const t0 = performance.now();
  let first = null, chunks = 0, usage = null, ended = "";
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", body: JSON.stringify(body), signal: state.controller.signal,
      headers: headers({ "Content-Type": "application/json" }) });
    if (!r.ok) {
      const e = await r.json().catch(() => ({}));
      throw new Error((e.error && e.error.message) || "HTTP " + r.status);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) usage = msg.usage;
        (msg.choices || []).forEach((c) => {
          const piece = chat ? (c.delta && c.delta.content) : c.text;
          if (piece) {
            if (first === null) first = performance.now() - t0;
            out.textContent += piece;
            output.dataset.chunks = String(++chunks);
          }
          if (c.finish_reason) ended = c.finish_reason;
        });
      }
    }
    const secs = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : chunks;
    $("stats").textContent = `${n} tokens in ${secs.toFixed(2)} s (${(n / secs).toFixed(0)} tok/s),` +
      ` first token after ${first === null ? "–" : first.toFixed(0) + " ms"}, ended: ${ended}`;
  } catch (e) {
    $("stats").textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
  } finally {
    output.dataset.done = "true";
    $("generate").disabled = false; $("stopbtn").disabled = true;
    state.controller = null;
  }
}

$("generate").addEventListener("click", generate);
$("stopbtn").addEventListener("click", () => state.controller && state.controller.abort());

refreshRuns();
setInterval(refreshRuns, 5000);
setInterval(refreshMetrics, 2000);
