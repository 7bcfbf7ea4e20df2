"""Loss curves: `folio plot RUN_DIR|LOGFILE|- ...` draws train loss (raw and smoothed) and val
loss for one or many runs as a PNG (matplotlib, headless) and optionally a self-contained HTML.

`curves()` turns rows into the plotted series; PNG and HTML both draw exactly those.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from folio import fsutil
from folio.config import PlotConfig
from folio.errors import ConfigError, DataError
from folio.watch.metrics import PLOT_FILE, Metrics, parse_log, read_metrics

# --x choice -> (row key, axis label)
X_AXES = {"iter": ("iter", "iteration"), "tokens": ("tokens", "tokens seen"),
          "time": ("time_s", "wall time")}
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22")
LOG_TICKS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)  # log-y ticks per decade
VAL_COLOR = "#d62728"  # val markers of a single run stand out from its train curve
REST_FACTOR = 30  # loss.png refreshes during training use at most ~1/30 of one core


@dataclass
class Curves:
    """What is drawn for one run: x values are in the plot's units (see `x_scale`)."""

    name: str
    label: str  # legend label: the run name plus what tells it apart from the others
    color: str
    train_x: np.ndarray
    train_y: np.ndarray  # raw train loss at each log line
    smooth_y: np.ndarray  # EMA of train_y
    eval_x: np.ndarray
    eval_y: np.ndarray  # val loss at each eval
    eval_iter: np.ndarray
    eval_train_y: np.ndarray  # train loss measured at each eval


@dataclass
class Chart:
    """Everything a renderer needs: the series plus the labels around them."""

    runs: list[Curves]
    title: str
    x_label: str
    logy: bool
    smooth: int


# ---------------------------------------------------------------- series

def ema(y: np.ndarray, span: int) -> np.ndarray:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing); NaNs skipped."""
    alpha = 2.0 / (span + 1)
    out = np.empty_like(y, dtype=float)
    avg, weight = 0.0, 0.0
    for i, v in enumerate(y):
        if math.isfinite(v):
            avg = (1 - alpha) * avg + alpha * v
            weight = (1 - alpha) * weight + alpha
        out[i] = avg / weight if weight else math.nan
    return out


def auto_span(n_points: int) -> int:
    """Default smoothing: about 1/30 of the curve, at least 5 points."""
    return max(5, n_points // 30)


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([math.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def curves(m: Metrics, x: str = "iter", smooth: int | None = None, *, label: str = "",
           color: str = COLORS[0], x_scale: float = 1.0) -> Curves:
    """The series plotted for run `m` against `x` ("iter", "tokens" or "time"), x divided by
    `x_scale`. A log with only eval lines uses the eval train loss as the train curve."""
    key = X_AXES[x][0]
    rows = m.train + m.eval
    if any(r.get(key) is None for r in rows):
        raise DataError(f"{m.name} has no {x} values (a nanoGPT log only has iterations): "
                        f"plot it with --x iter")
    train, train_key = (m.train, "loss") if m.train else (m.eval, "train_loss")
    train_y = _column(train, train_key)
    return Curves(
        name=m.name, label=label or m.name, color=color,
        train_x=_column(train, key) / x_scale, train_y=train_y,
        smooth_y=ema(train_y, smooth or auto_span(len(train_y))),
        eval_x=_column(m.eval, key) / x_scale, eval_y=_column(m.eval, "val_loss"),
        eval_iter=_column(m.eval, "iter"), eval_train_y=_column(m.eval, "train_loss"))


def time_unit(runs: list[Metrics]) -> tuple[str, float]:
    """Seconds, minutes or hours, whichever keeps the wall-time axis numbers readable."""
    longest = max((r.get("time_s") or 0.0 for m in runs for r in m.train + m.eval), default=0.0)
    if longest > 3 * 3600:
        return "h", 3600.0
    if longest > 180:
        return "min", 60.0
    return "s", 1.0


def make_chart(runs: list[Metrics], x: str = "iter", *, logy: bool = False,
               smooth: int | None = None) -> Chart:
    """Series, legend labels and title for `runs` (what they share goes in the title)."""
    if x not in X_AXES:
        raise ConfigError(f"--x {x!r} is not one of {', '.join(X_AXES)}")
    x_label, x_scale = X_AXES[x][1], 1.0
    if x == "time":
        unit, x_scale = time_unit(runs)
        x_label = f"{x_label} ({unit})"
    descs = [describe(m.info) for m in runs]
    shared = {k: v for k, v in descs[0].items() if all(d.get(k) == v for d in descs)}
    names = [m.name for m in runs]
    title = (names[0] if len(runs) == 1 else f"{len(runs)} runs") + \
        "".join(f" · {v}" for v in shared.values())
    out = []
    for i, (m, d) in enumerate(zip(runs, descs, strict=True)):
        extra = [v for k, v in d.items() if k not in shared]
        label = m.name + (f" ({', '.join(extra)})" if extra else "")
        out.append(curves(m, x, smooth, label=label, color=COLORS[i % len(COLORS)],
                          x_scale=x_scale))
    span = smooth or auto_span(max(len(c.train_y) for c in out))
    return Chart(out, title, x_label, logy, span)


def describe(info: dict) -> dict[str, str]:
    """Model size and dataset from a run.json dict; keys are missing when unknown."""
    out = {}
    model = info.get("model") if isinstance(info.get("model"), dict) else None
    if model:
        n = (info["n_params"] if "n_params" in info
             else _count_params(json.dumps(model, sort_keys=True)))
        shape = "/".join(f"{model[k]}{s}" for k, s in
                         (("n_layer", "L"), ("n_head", "H"), ("n_embd", "d")) if k in model)
        out["model"] = ", ".join(p for p in (f"{format_count(n)} params" if n else "", shape)
                                 if p)
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    if cfg.get("dataset"):
        out["dataset"] = str(cfg["dataset"])
    return {k: v for k, v in out.items() if v}


@functools.lru_cache(maxsize=16)
def _count_params(model_json: str) -> int | None:
    """Non-embedding parameter count (as nanoGPT prints it), from the model itself built
    on the meta device (no memory, no compute)."""
    try:
        import torch

        from folio.model.gpt import GPT, GPTConfig
        with torch.device("meta"):
            return GPT(GPTConfig(**json.loads(model_json))).num_params()
    except Exception:  # an unknown/old model dict: the title just leaves the count out
        return None


def format_count(n: float) -> str:
    """10.65M, 124M, 1.56B, 85.30K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}" if n < 100 * scale else f"{n / scale:.0f}{suffix}"
    return str(int(n))


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
    single = len(chart.runs) == 1
    for c in chart.runs:
        name = "" if single else f"{c.label}: "
        ax.plot(c.train_x, c.train_y, color=c.color, alpha=0.25, lw=0.8,
                label="train loss (raw)" if single else "_nolegend_", gid=f"{c.name}:train")
        ax.plot(c.train_x, c.smooth_y, color=c.color, lw=1.8, gid=f"{c.name}:smooth",
                label=f"{name}train loss, smoothed (EMA span {chart.smooth})")
        if len(c.eval_x):
            best = int(np.nanargmin(c.eval_y)) if np.isfinite(c.eval_y).any() else 0
            ax.plot(c.eval_x, c.eval_y, color=VAL_COLOR if single else c.color, ls=":",
                    lw=1.0, marker="o", ms=5, mfc="white", mew=1.5, gid=f"{c.name}:val",
                    label=f"{name}val loss (best {c.eval_y[best]:.4f} at iter "
                          f"{int(c.eval_iter[best])})")
    ax.set_title(chart.title, fontsize=12)
    ax.set_xlabel(chart.x_label)
    ax.set_ylabel("loss (cross-entropy)")
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
             smooth: int | None = None):
    """Draw `runs` and write the PNG atomically; returns the Figure (for inspection)."""
    fig = make_figure(make_chart(runs, x, logy=logy, smooth=smooth))
    save_png(fig, path)
    return fig


def save_png(fig, path: str | Path) -> None:
    fsutil.atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


# ---------------------------------------------------------------- refresh during training

class BackgroundRefresh:
    """Redraws `<run_dir>/loss.png` from metrics.jsonl in a separate low-priority process, so
    training never waits for matplotlib nor shares the GIL or a busy core with it.

    Requests made while a render runs collapse into one render of the latest rows; `close()`
    draws once more and waits for it.
    """

    def __init__(self, run_dir: Path, info: dict):
        info = dict(info)
        if isinstance(info.get("model"), dict) and "n_params" not in info:
            # counted here, where torch is already imported, so the child never imports it
            info["n_params"] = _count_params(json.dumps(info["model"], sort_keys=True))
        self.args = [sys.executable, "-c", "import sys; from folio.watch.plot import refresh_loop; "
                     "refresh_loop(sys.argv[1], sys.argv[2])", str(run_dir), json.dumps(info)]
        self.proc: subprocess.Popen | None = None  # started at the first request

    def _start(self) -> subprocess.Popen:
        src = str(Path(__file__).resolve().parents[1])  # so the child imports this folio
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        return subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                env=env, start_new_session=True)  # Ctrl+C is for training

    def request(self) -> None:
        self.proc = self.proc or self._start()
        if self.proc.stdin.closed:
            return
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
        except OSError:  # the child died; it said why on stderr
            self.proc.stdin.close()

    def close(self, timeout: float = 60.0) -> None:
        if self.proc is None:  # never asked to draw
            return
        self.request()
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def refresh_loop(run_dir: str, info_json: str) -> None:
    """The child of `BackgroundRefresh`: renders on newline requests read from stdin, until
    stdin closes. Requests that arrive while it renders or rests collapse into one render."""
    with contextlib.suppress(AttributeError, OSError):
        os.nice(10)  # training first when cores are busy
    fd, run_dir, info = sys.stdin.fileno(), Path(run_dir), json.loads(info_json)
    warned, next_at = False, 0.0
    while os.read(fd, 4096):  # blocks until a request; b"" once closed with nothing pending
        closed = False
        # Rest REST_FACTOR x the last render time between renders, so drawing takes at most
        # ~1/REST_FACTOR of one core however often evals come; closing ends the rest at once.
        while not closed and (left := next_at - time.monotonic()) > 0 and _readable(fd, left):
            closed = not os.read(fd, 4096)
        started = time.monotonic()
        try:
            metrics = read_metrics(run_dir)
            metrics.info = info
            plot_png([metrics], run_dir / PLOT_FILE)
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
    chart = make_chart(runs, cfg.x, logy=cfg.logy, smooth=cfg.smooth)
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
