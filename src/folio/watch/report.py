"""Report cards: one self-contained HTML page, and its markdown twin, for one run or several
side by side: the machine, versions, the settings that differ from the defaults, time,
tokens, FLOPs, throughput, the measured fast path, loss and bits-per-byte curves, best val,
`folio eval` results and samples. Built from the run dir's files alone (run.json,
metrics.jsonl, evals.jsonl, samples.json): no torch, no model, no network.
"""

from __future__ import annotations

import dataclasses
import html
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from folio import __version__, fsutil
from folio.config import TrainConfig
from folio.errors import ConfigError, DataError
from folio.store.rundir import (
    REPORT_FILE,
    RunInfo,
    read_evals,
    read_samples,
)
from folio.watch.chart import X_AXES, Chart, describe, make_chart
from folio.watch.metrics import Metrics, format_duration, read_metrics
from folio.watch.plot_html import CHART_SCRIPT, CHART_STYLE, chart_block, page


@dataclass
class Card:
    """What one run's report shows, read from its run dir."""

    name: str
    run_dir: Path
    metrics: Metrics
    info: RunInfo | None
    evals: list[dict[str, Any]]
    samples: dict[str, Any] | None


def load_card(run_dir: str | Path) -> Card:
    """A run dir's files for its card; a path that is not a run dir with metrics is a
    one-line DataError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir} is not a run dir: give a directory written by `folio train`")
    metrics = read_metrics(run_dir)
    return Card(run_dir.name, run_dir, metrics, metrics.info, read_evals(run_dir),
                read_samples(run_dir))


def load_cards(run_dirs: list[str | Path]) -> list[Card]:
    """Cards of `run_dirs`, named apart when two dirs share a name (out/a, other/a)."""
    if not run_dirs:
        raise ConfigError("give at least one run dir")
    cards = [load_card(d) for d in run_dirs]
    names = [c.name for c in cards]
    for c in cards:
        if names.count(c.name) > 1:
            c.name = f"{c.run_dir.resolve().parent.name}/{c.name}"
        c.metrics.name = c.name
    return cards


# ------------------------------------------------------------------------ what is shown

def _defaults() -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


DEFAULTS = _defaults()
MISSING = "–"


def changed_settings(info: RunInfo | None) -> dict[str, Any]:
    """The run's settings that differ from `folio train`'s defaults, in run.json's order."""
    if info is None:
        return {}
    return {k: v for k, v in info.config.items() if k not in DEFAULTS or DEFAULTS[k] != v}


def _median(rows: list[dict], key: str) -> float | None:
    """Median over the log lines after the first (which carries start-up costs)."""
    values = [r[key] for r in rows[1:] or rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def total_tokens(card: Card) -> int | None:
    rows = card.metrics.train + card.metrics.eval
    tokens = [r["tokens"] for r in rows if isinstance(r.get("tokens"), (int, float))]
    return int(max(tokens)) if tokens else None


def format_si(value: float, unit: str) -> str:
    """1.23 PFLOP, 45.6 GFLOP."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6),
                          ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def hardware_line(info: RunInfo | None) -> str:
    """`AMD EPYC 7B13 (25/1/1) · avx2 fma · 2 threads · cpu` (GPU name first on a GPU)."""
    if info is None:
        return MISSING
    hw = info.hardware or {}
    parts = [hw.get("gpu"), hw.get("cpu"),
             " ".join(hw.get("cpu_flags") or []) or None,
             f"{hw['threads']} threads" if hw.get("threads") else None, info.device]
    return " · ".join(str(p) for p in parts if p) or MISSING


def versions_line(info: RunInfo | None) -> str:
    if info is None or not info.versions:
        return MISSING
    v = info.versions
    parts = [f"{k} {v[k]}" for k in ("python", "torch", "folio") if v.get(k)]
    if info.git:
        parts.append(f"git {info.git[:10]}")
    return " · ".join(parts)


def fast_path_line(info: RunInfo | None) -> str:
    """The measured fast path: choice, its knobs, the speed-up over eager float32."""
    if info is None:
        return MISSING
    t = info.tuning
    if not t:
        return f"not measured ({info.dtype or 'default'} kernels)"
    knobs = ", ".join(f"{k}={v}" for k, v in (t.get("knobs") or {}).items())
    speedup, steps = t.get("speedup"), t.get("ms_per_step")
    speed = f"{speedup:.2f}x eager float32" if isinstance(speedup, (int, float)) else ""
    if isinstance(steps, dict):  # each candidate's time
        steps = ", ".join(f"{k} {v:.1f}" for k, v in steps.items()
                          if isinstance(v, (int, float)))
        steps = f"ms/step: {steps}" if steps else ""
    elif isinstance(steps, (int, float)):
        steps = f"{steps:.1f} ms/step"
    how = "cached measurement" if t.get("cached") else "measured at start"
    return " · ".join(p for p in (str(t.get("choice")), knobs, speed, steps or "", how) if p)


def facts(card: Card) -> dict[str, str]:
    """The card's summary rows, label -> text."""
    info, m = card.info, card.metrics
    d = describe(info)
    model = d.get("model", MISSING)
    if info is not None and info.model:
        model += f", block {info.model.get('block_size')}, vocab {info.model.get('vocab_size')}"
    tokens = total_tokens(card)
    fpt = info.flops_per_token if info else None
    train_s = max((r.get("time_s") or 0.0 for r in m.train + m.eval), default=0.0)
    wall = format_duration(info.wall_s) if info and info.wall_s else MISSING
    tps, mfu = _median(m.train, "tokens_per_sec"), _median(m.train, "mfu")
    out = {
        "model": model,
        "dataset": (d.get("dataset") or MISSING) + (
            f" ({info.tokenizer.get('kind')} tokenizer)" if info and info.tokenizer else ""),
        "hardware": hardware_line(info),
        "versions": versions_line(info),
        "precision": MISSING if info is None else
        f"{info.dtype}, compile {info.compile}, {info.world_size} process(es)",
        "fast path": fast_path_line(info),
        "iterations": MISSING if info is None else
        f"{info.iter_num:,}" + (f" of {info.config['max_iters']:,}"
                                if isinstance(info.config.get("max_iters"), int) else ""),
        "wall time": f"{wall} (training loop {format_duration(train_s)})",
        "tokens": f"{tokens:,}" if tokens else MISSING,
        "FLOPs": format_si(tokens * fpt, "FLOP") if tokens and fpt else MISSING,
        "tokens/s": f"{tps:,.0f}" if tps else MISSING,
        "MFU": f"{mfu * 100:.2f}%" if mfu else MISSING,
        "best val loss": _best(info, "loss"),
        "best val bpb": _best(info, "bpb"),
    }
    return out


def _best(info: RunInfo | None, which: str) -> str:
    value = None if info is None else (info.best_val_loss if which == "loss" else
                                       info.best_val_bpb)
    return MISSING if value is None else f"{value:.4f} at iter {info.best_iter}"


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested results as one level of dotted keys ({"a": {"b": 1}} -> {"a.b": 1})."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def eval_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """evals.jsonl rows of any kind (folio eval, lm-eval tasks) as a header and text rows:
    a value with a `<key>_ci` or `<key>_stderr` beside it is shown as value ± that."""
    flat = [flatten(r) for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    errors = {k: e for k in keys for e in (f"{k}_ci", f"{k}_stderr", f"{k},stderr")
              if e in keys}
    shown = [k for k in keys if k not in errors.values()]
    table = []
    for r in flat:
        cells = []
        for k in shown:
            text = _num(r.get(k))
            if k in errors and isinstance(r.get(errors[k]), (int, float)):
                text += f" ± {_num(r[errors[k]])}"
            cells.append(text)
        table.append(cells)
    return shown, table


def _num(v: Any) -> str:
    """A measured number: 4 decimals (1 from 100 up); anything else as `_cell` shows it."""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
    return _cell(v)


def _cell(v: Any) -> str:
    if v is None:
        return MISSING
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return v if isinstance(v, str) else json.dumps(v)


# ------------------------------------------------------------------------ curves

def _with_flops(card: Card) -> Metrics:
    """The run's metrics with a `flops` value per row (tokens x FLOPs per token)."""
    fpt = card.info.flops_per_token if card.info else None
    if not fpt:
        raise DataError(f"{card.name}'s run.json has no FLOPs per token (written before they "
                        "were recorded): use --x iter, tokens or time")
    add = [{**r, "flops": r["tokens"] * fpt if r.get("tokens") is not None else None}
           for r in card.metrics.train + card.metrics.eval]
    n = len(card.metrics.train)
    return dataclasses.replace(card.metrics, train=add[:n], eval=add[n:])


def charts(cards: list[Card], x: str) -> list[tuple[str, Chart]]:
    """(element-id prefix, chart): loss, and bits per byte for the runs that measured it."""
    if x not in X_AXES:
        raise ConfigError(f"--x {x!r} is not one of {', '.join(X_AXES)}")
    runs = [_with_flops(c) if x == "flops" else c.metrics for c in cards]
    out = [("loss-", make_chart(runs, x, metric="loss"))]
    with_bpb = [m for m in runs if any(r.get("val_bpb") is not None for r in m.eval)]
    if with_bpb:
        out.append(("bpb-", make_chart(with_bpb, x, metric="bpb")))
    for _, chart in out:
        chart.title = chart.y_label[0].upper() + chart.y_label[1:] + " by " + chart.x_label
    return out


# ------------------------------------------------------------------------ HTML

def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def settings_rows(cards: list[Card]) -> tuple[list[str], list[list[str]]]:
    """One run: its settings that differ from the defaults, with the default. Several: the
    settings that differ between the runs, or from the defaults in any run, one column each."""
    changed = [changed_settings(c.info) for c in cards]
    if len(cards) == 1:
        return (["setting", "value", "default"],
                [[k, _cell(v), _cell(DEFAULTS.get(k))] for k, v in changed[0].items()])
    keys = list(dict.fromkeys(k for ch in changed for k in ch))
    configs = [c.info.config if c.info else {} for c in cards]
    rows = []
    for k in keys:
        values = [_cell(cfg.get(k, DEFAULTS.get(k))) for cfg in configs]
        if len(set(values)) > 1:
            rows.append([k, *values])
    return ["setting", *[c.name for c in cards]], rows


def render_report(cards: list[Card], x: str = "iter", show_paths: bool = True) -> str:
    """The report card page of `cards` (one run, or several compared); `show_paths` False
    names runs by their names alone (a server does not show its disk)."""
    names = ", ".join(c.name for c in cards)
    all_facts = [facts(c) for c in cards]
    fact_rows = [[label, *[f[label] for f in all_facts]] for label in all_facts[0]]
    header, rows = settings_rows(cards)
    settings_title = ("Settings that differ from the defaults" if len(cards) == 1 else
                      "Settings that differ between the runs")
    where = [str(c.run_dir) if show_paths else c.name for c in cards]
    parts = [f"<h1>folio report · {_e(names)}</h1>",
             f'<p class="sub">written by folio {_e(__version__)} from {_e(", ".join(where))}'
             "</p>",
             "<section><h2>Run</h2>" + _table(["", *[c.name for c in cards]], fact_rows,
                                               "facts") + "</section>",
             f"<section><h2>{settings_title}</h2>"
             + (_table(header, rows, "settings") if rows else
                '<p class="muted">none: every setting is the default</p>') + "</section>"]
    chart_list = charts(cards, x)
    parts.append("<section><h2>Curves</h2>" + "".join(chart_block(chart, prefix)
                                                         for prefix, chart in chart_list)
                 + "</section>")
    parts.append(_evals_html(cards, where))
    parts.append(_samples_html(cards, where))
    script = CHART_SCRIPT + "".join(f'folioChart("{p}");\n' for p, _ in chart_list)
    return page(f"folio report · {names}", REPORT_STYLE + CHART_STYLE, "\n".join(parts),
                script)


def _evals_html(cards: list[Card], where: list[str]) -> str:
    out = ["<section><h2>Evaluations</h2>"]
    for c, run in zip(cards, where, strict=True):
        if len(cards) > 1:
            out.append(f"<h3>{_e(c.name)}</h3>")
        if not c.evals:
            out.append(f'<p class="muted">none yet: <code>folio eval {_e(run)}</code> '
                       "adds some</p>")
            continue
        header, rows = eval_table(c.evals)
        out.append(f'<div class="scroll">{_table(header, rows, "evals")}</div>')
    return "".join(out) + "</section>"


def _samples_html(cards: list[Card], where: list[str]) -> str:
    out = ["<section><h2>Samples</h2>"]
    for c, run in zip(cards, where, strict=True):
        if len(cards) > 1:
            out.append(f"<h3>{_e(c.name)}</h3>")
        s = c.samples
        if not s or not s.get("samples"):
            out.append(f'<p class="muted">none: <code>folio report {_e(run)}</code> '
                       "generates them</p>")
            continue
        out.append(f'<p class="muted">{_e(samples_note(s))}</p>')
        for sample in s["samples"]:
            out.append(f'<pre class="sample"><span class="prompt">{_e(sample.get("prompt"))}'
                       f"</span>{_e(sample.get('text'))}</pre>")
    return "".join(out) + "</section>"


def samples_note(s: dict[str, Any]) -> str:
    note = (f"best weights (iter {s.get('best_iter')}), {s.get('max_new_tokens')} tokens per "
            f"prompt, seed {s.get('seed')}, temperature {s.get('temperature')}, "
            f"top_k {s.get('top_k')}")
    return note + ("" if s.get("complete", True) else "; cut short by the time limit")


REPORT_STYLE = """  body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1100px;
         padding: 0 16px 24px; color: #222; background: #fafafa; }
  h1 { font-size: 22px; margin: 16px 0 2px; }
  h2 { font-size: 16px; margin: 12px 0 8px; }
  h3 { font-size: 14px; margin: 10px 0 4px; }
  section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px;
            padding: 2px 14px 12px; margin-bottom: 12px; }
  .sub, .muted { color: #777; }
  .sub { margin: 0 0 12px; font-size: 12px; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #eee;
           vertical-align: top; }
  table.facts td:first-child { color: #555; white-space: nowrap; width: 1%; }
  table.settings { width: auto; min-width: 50%; }
  table.settings td:first-child { padding-right: 32px; }
  .scroll { overflow-x: auto; }
  pre.sample { white-space: pre-wrap; background: #f4f4f4; padding: 8px 10px; margin: 6px 0;
               font: 13px/1.35 ui-monospace, monospace; border-radius: 4px; }
  .prompt { color: #888; }
  .folio-chart { margin-bottom: 14px; }
"""


# ------------------------------------------------------------------------ markdown

def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_md, row)) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(cards: list[Card]) -> str:
    """The report's markdown twin: the same tables, each run's evaluations during training
    instead of the curves, and the samples."""
    all_facts = [facts(c) for c in cards]
    out = [f"# folio report · {', '.join(c.name for c in cards)}", "",
           _md_table(["", *[c.name for c in cards]],
                     [[label, *[f[label] for f in all_facts]] for label in all_facts[0]]), ""]
    header, rows = settings_rows(cards)
    out += ["## Settings that differ from the defaults" if len(cards) == 1 else
            "## Settings that differ between the runs", "",
            _md_table(header, rows) if rows else "none: every setting is the default", ""]
    keys = ("iter", "tokens", "time_s", "train_loss", "val_loss", "train_bpb", "val_bpb")
    for c in cards:
        out += [f"## Validation during training: {c.name}", ""]
        evals = c.metrics.eval
        out += [_md_table(["iter", "tokens", "time (s)", "train loss", "val loss", "train bpb",
                           "val bpb"], [[_num(r.get(k)) for k in keys] for r in evals])
                if evals else "no evaluations", ""]
        if c.evals:
            out += [f"## Evaluations: {c.name}", "", _md_table(*eval_table(c.evals)), ""]
        if c.samples and c.samples.get("samples"):
            out += [f"## Samples: {c.name}", "", samples_note(c.samples), ""]
            for sample in c.samples["samples"]:
                text = str(sample.get("prompt", "")) + str(sample.get("text", ""))
                fence = "````" if "```" in text else "```"
                out += [f"{fence}text", text, fence, ""]
    return "\n".join(out)


# ------------------------------------------------------------------------ writing

def report_path(run_dirs: list[str | Path], out: str = "") -> Path:
    """Where the report goes: `out`, RUN/report.html for one run, else ./report.html."""
    if out:
        return Path(out)
    return Path(run_dirs[0]) / REPORT_FILE if len(run_dirs) == 1 else Path(REPORT_FILE)


def check_target(run_dirs: list[str | Path], out: str = "") -> Path:
    """The report's path (`report_path`), refused in one line when it cannot be written."""
    path = report_path(run_dirs, out)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out {path} must end in .html (the markdown twin goes beside it "
                          "as .md)")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def write_report(run_dirs: list[str | Path], out: str = "", x: str = "iter") -> Path:
    """Write the report of `run_dirs` (HTML at the returned path, markdown beside it as
    .md), atomically; bad run dirs and an unwritable path fail before anything is written."""
    path = check_target(run_dirs, out)
    cards = load_cards(run_dirs)
    page, md = render_report(cards, x), render_markdown(cards)
    fsutil.atomic_write_text(path, page)
    fsutil.atomic_write_text(path.with_suffix(".md"), md)
    return path
