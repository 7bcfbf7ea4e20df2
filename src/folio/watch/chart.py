"""Loss (or bits-per-byte) curves as data: the series, labels and title that the PNG and the
HTML page draw.

`curves()` turns metrics rows into plotted series; `make_chart()` lays out several runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from folio.errors import ConfigError, DataError
from folio.store.rundir import RunInfo
from folio.watch.metrics import Metrics

# --x choice -> (row key, axis label)
X_AXES = {"iter": ("iter", "iteration"), "tokens": ("tokens", "tokens seen"),
          "time": ("time_s", "wall time"), "flops": ("flops", "training FLOPs")}
# --metric choice -> (the word in legends, the y-axis label)
METRICS = {"loss": ("loss", "loss (cross-entropy)"), "bpb": ("bpb", "bits per byte")}
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22")
LOG_TICKS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)  # log-y ticks per decade
VAL_COLOR = "#d62728"  # val markers of a single run stand out from its train curve


@dataclass
class Curves:
    """What is drawn for one run: x values are in the plot's units (see `x_scale`)."""

    name: str
    label: str  # legend label: the run name plus what tells it apart from the others
    color: str
    train_x: np.ndarray
    train_y: np.ndarray  # raw train loss at each log line (train bpb at each eval)
    smooth_y: np.ndarray  # EMA of train_y
    eval_x: np.ndarray
    eval_y: np.ndarray  # val loss (bpb) at each eval
    eval_iter: np.ndarray
    eval_train_y: np.ndarray  # train loss (bpb) measured at each eval


@dataclass
class Chart:
    """Everything a renderer needs: the series plus the labels around them."""

    runs: list[Curves]
    title: str
    x_label: str
    logy: bool
    smooth: int
    metric: str = "loss"  # a key of METRICS

    @property
    def word(self) -> str:
        """What the curves measure, in legends: loss or bpb."""
        return METRICS[self.metric][0]

    @property
    def y_label(self) -> str:
        return METRICS[self.metric][1]


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
           color: str = COLORS[0], x_scale: float = 1.0, metric: str = "loss") -> Curves:
    """The series plotted for run `m` against `x` ("iter", "tokens" or "time"), x divided by
    `x_scale`. A log with only eval lines uses the eval train loss as the train curve; so does
    `metric` "bpb" (bits per byte), measured at evaluations only."""
    key = X_AXES[x][0]
    rows = m.train + m.eval
    if any(r.get(key) is None for r in rows):
        raise DataError(f"{m.name} has no {x} values (a nanoGPT log only has iterations): "
                        f"plot it with --x iter")
    if metric == "bpb" and not any(r.get("val_bpb") is not None for r in m.eval):
        raise DataError(f"{m.name} has no bits per byte (written before folio measured them, "
                        "or a nanoGPT log): plot it with --metric=loss")
    word = METRICS[metric][0]
    train, train_key = (m.train, "loss") if m.train and metric == "loss" else \
        (m.eval, f"train_{word}")
    train_y = _column(train, train_key)
    return Curves(
        name=m.name, label=label or m.name, color=color,
        train_x=_column(train, key) / x_scale, train_y=train_y,
        smooth_y=ema(train_y, smooth or auto_span(len(train_y))),
        eval_x=_column(m.eval, key) / x_scale, eval_y=_column(m.eval, f"val_{word}"),
        eval_iter=_column(m.eval, "iter"), eval_train_y=_column(m.eval, f"train_{word}"))


def time_unit(runs: list[Metrics]) -> tuple[str, float]:
    """Seconds, minutes or hours, whichever keeps the wall-time axis numbers readable."""
    longest = max((r.get("time_s") or 0.0 for m in runs for r in m.train + m.eval), default=0.0)
    if longest > 3 * 3600:
        return "h", 3600.0
    if longest > 180:
        return "min", 60.0
    return "s", 1.0


def flops_unit(runs: list[Metrics]) -> tuple[str, float]:
    """GFLOP, TFLOP, PFLOP or EFLOP: the largest that keeps the axis numbers above 1."""
    most = max((r.get("flops") or 0.0 for m in runs for r in m.train + m.eval), default=0.0)
    unit, scale = "GFLOP", 1e9
    for name, s in (("TFLOP", 1e12), ("PFLOP", 1e15), ("EFLOP", 1e18)):
        if most >= 10 * s:
            unit, scale = name, s
    return unit, scale


def make_chart(runs: list[Metrics], x: str = "iter", *, logy: bool = False,
               smooth: int | None = None, metric: str = "loss") -> Chart:
    """Series, legend labels and title for `runs` (what they share goes in the title).
    `metric` "bpb" draws bits per byte, which evaluations measure: unsmoothed by default."""
    if x not in X_AXES:
        raise ConfigError(f"--x {x!r} is not one of {', '.join(X_AXES)}")
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    if metric == "bpb":
        smooth = smooth or 1
    x_label, x_scale = X_AXES[x][1], 1.0
    if x == "time":
        unit, x_scale = time_unit(runs)
        x_label = f"{x_label} ({unit})"
    elif x == "flops":
        unit, x_scale = flops_unit(runs)
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
                          x_scale=x_scale, metric=metric))
    span = smooth or auto_span(max(len(c.train_y) for c in out))
    return Chart(out, title, x_label, logy, span, metric)


def describe(info: RunInfo | None) -> dict[str, str]:
    """Model size and dataset from a run's run.json; keys are missing when unknown (the
    parameter count of a run.json written before it was recorded, say)."""
    if info is None:
        return {}
    n, model = info.n_params, info.model
    shape = "/".join(f"{model[k]}{s}" for k, s in
                     (("n_layer", "L"), ("n_head", "H"), ("n_embd", "d")) if k in model)
    count = f"{format_count(n)} params" if isinstance(n, int) and n > 0 else ""
    out = {"model": ", ".join(p for p in (count, shape) if p),
           "dataset": info.dataset or ""}
    return {k: v for k, v in out.items() if v}


def format_count(n: float) -> str:
    """10.65M, 124M, 1.56B, 85.30K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}" if n < 100 * scale else f"{n / scale:.0f}{suffix}"
    return str(int(n))
