"""Loss curves: `folio plot RUN_DIR|LOGFILE|- ...` draws train loss (raw and smoothed) and val
loss (or, with --metric=bpb, bits per byte) for one or many runs as a PNG (matplotlib,
headless) and optionally a self-contained HTML.

`curves()` turns rows into the plotted series; PNG and HTML both draw exactly those.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from pathlib import Path

import numpy as np

from folio import fsutil
from folio.config import PlotConfig
from folio.errors import ConfigError, DataError
from folio.store.rundir import PLOT_FILE
from folio.watch.chart import LOG_TICKS, VAL_COLOR, X_AXES, Chart, make_chart
from folio.watch.metrics import Metrics, parse_log, read_metrics

REST_FACTOR = 30  # loss.png refreshes during training use at most ~1/30 of one core


# ---------------------------------------------------------------- PNG

def make_figure(chart: Chart):
    """A matplotlib Figure of `chart` (object API, no pyplot: safe off the main thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, LogLocator, NullLocator

    # Fixed margins: a layout engine would double the render time of a refresh during training.
    fig = Figure(figsize=(9, 5.2), dpi=100)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.93)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    single, word = len(chart.runs) == 1, chart.word
    for c in chart.runs:
        name = "" if single else f"{c.label}: "
        ax.plot(c.train_x, c.train_y, color=c.color, alpha=0.25, lw=0.8,
                label=f"train {word} (raw)" if single else "_nolegend_", gid=f"{c.name}:train")
        ax.plot(c.train_x, c.smooth_y, color=c.color, lw=1.8, gid=f"{c.name}:smooth",
                label=f"{name}train {word}, smoothed (EMA span {chart.smooth})")
        if len(c.eval_x):
            best = int(np.nanargmin(c.eval_y)) if np.isfinite(c.eval_y).any() else 0
            ax.plot(c.eval_x, c.eval_y, color=VAL_COLOR if single else c.color, ls=":",
                    lw=1.0, marker="o", ms=5, mfc="white", mew=1.5, gid=f"{c.name}:val",
                    label=f"{name}val {word} (best {c.eval_y[best]:.4f} at iter "
                          f"{int(c.eval_iter[best])})")
    ax.set_title(chart.title, fontsize=12)
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel(chart.y_label)
    if chart.x_label == X_AXES["tokens"][1]:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if chart.logy:
        ax.set_yscale("log")
        # losses span less than a decade: label 1, 1.25, 1.5, 2, ... instead of powers of 10
        ax.yaxis.set_major_locator(LogLocator(subs=LOG_TICKS))
        ax.yaxis.set_major_formatter("{x:.3g}")
        ax.yaxis.set_minor_locator(NullLocator())
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.margins(x=0.01)
    ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    return fig


def plot_png(runs: list[Metrics], path: str | Path, *, x: str = "iter", logy: bool = False,
             smooth: int | None = None, metric: str = "loss"):
    """Draw `runs` and write the PNG atomically; returns the Figure (for inspection)."""
    fig = make_figure(make_chart(runs, x, logy=logy, smooth=smooth, metric=metric))
    save_png(fig, path)
    return fig


def save_png(fig, path: str | Path) -> None:
    fsutil.atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


# ---------------------------------------------------------------- refresh during training

def refresh_loop(run_dir: str) -> None:
    """The child of `BackgroundRefresh`: renders on newline requests read from stdin, until
    stdin closes. Requests that arrive while it renders or rests collapse into one render."""
    with contextlib.suppress(AttributeError, OSError):
        os.nice(10)  # training first when cores are busy
    fd, run_dir = sys.stdin.fileno(), Path(run_dir)
    warned, next_at = False, 0.0
    while os.read(fd, 4096):  # blocks until a request; b"" once closed with nothing pending
        closed = False
        # Rest REST_FACTOR x the last render time between renders, so drawing takes at most
        # ~1/REST_FACTOR of one core however often evals come; closing ends the rest at once.
        while not closed and (left := next_at - time.monotonic()) > 0 and _readable(fd, left):
            closed = not os.read(fd, 4096)
        started = time.monotonic()
        try:
            plot_png([read_metrics(run_dir)], run_dir / PLOT_FILE)
        except Exception as e:  # a plot must never disturb training
            if not warned:
                print(f"folio: warning: could not refresh {run_dir / PLOT_FILE}: {e}",
                      file=sys.stderr)
                warned = True
        next_at = time.monotonic() + REST_FACTOR * (time.monotonic() - started)
        if closed:
            return


def _readable(fd: int, timeout: float) -> bool:
    """Wait up to `timeout` s for input on fd (no waiting where pipes cannot be polled)."""
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- the plot command

def load_input(arg: str) -> Metrics:
    """A run dir, a metrics.jsonl, a console log file, or `-` (a log on stdin)."""
    if arg == "-":
        return parse_log(sys.stdin.read(), name="stdin")
    path = Path(arg)
    if path.is_dir() or path.suffix == ".jsonl":
        return read_metrics(path)
    if not path.is_file():
        raise DataError(f"no such run dir or log file: {arg}")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {arg}: {e.strerror}") from None
    return parse_log(text, name=path.stem)


def check_writable(path: Path, option: str) -> None:
    """Fail before drawing anything if `path` cannot be written."""
    parent = path.parent
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory: give a file name")
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: directory {parent} is not writable")


def _unique_names(runs: list[Metrics], args: list[str]) -> None:
    """Runs that share a name (out/ in two places) are labelled by the path given instead."""
    names = [m.name for m in runs]
    for m, arg in zip(runs, args, strict=True):
        if names.count(m.name) > 1:
            m.name = arg


def plot_runs(cfg: PlotConfig) -> list[Path]:
    """`folio plot`: draw cfg.inputs as a PNG (and HTML if asked); returns the files written."""
    single_dir = len(cfg.inputs) == 1 and Path(cfg.inputs[0]).is_dir()
    png = Path(cfg.output) if cfg.output else (
        Path(cfg.inputs[0]) / PLOT_FILE if single_dir else Path(PLOT_FILE))
    html = Path(cfg.html) if cfg.html else None
    check_writable(png, "-o")
    if html:
        check_writable(html, "--html")
    runs = [load_input(a) for a in cfg.inputs]
    _unique_names(runs, cfg.inputs)
    chart = make_chart(runs, cfg.x, logy=cfg.logy, smooth=cfg.smooth, metric=cfg.metric)
    save_png(make_figure(chart), png)
    written = [png]
    if html:
        from folio.watch.plot_html import render_html
        fsutil.atomic_write_text(html, render_html(chart))
        written.append(html)
    n_evals = sum(len(c.eval_x) for c in chart.runs)
    print(f"wrote {' and '.join(map(str, written))} ({len(runs)} run{'s' * (len(runs) > 1)}, "
          f"{sum(len(c.train_x) for c in chart.runs)} train points, {n_evals} evals)")
    return written
