"""Training metrics: the console lines, `metrics.jsonl` (writer and reader), and a parser
that turns pasted nanoGPT or folio console output back into the same rows.

Rows are plain dicts with the DESIGN.md keys; `Metrics` holds one run's train and eval rows.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from folio import fsutil
from folio.errors import CheckpointError, ConfigError, DataError
from folio.extras import need
from folio.store.rundir import METRICS_FILE, TENSORBOARD_DIR, RunInfo, read_run_info
from folio.watch.refresh import BackgroundRefresh

TRAIN_KEYS = ("iter", "tokens", "time_s", "loss", "lr", "ms_per_iter", "tokens_per_sec", "mfu")
EVAL_KEYS = ("iter", "tokens", "time_s", "train_loss", "val_loss", "train_bpb", "val_bpb")


@dataclass
class Metrics:
    """One run's rows: `train` (one per log line) and `eval` (one per evaluation), by iter.

    `name` labels the run in plots; `info` is its run.json (None without one) for the title.
    """

    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    name: str = "run"
    info: RunInfo | None = None

    def __bool__(self) -> bool:
        return bool(self.train or self.eval)


# ---------------------------------------------------------------- console lines

def format_duration(seconds: float) -> str:
    """12s, 1m02s, 3h05m: short enough for a progress line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_train_line(iter: int, max_iters: int | None, loss: float, lr: float,
                      ms_per_iter: float, tokens_per_sec: float, mfu: float | None = None,
                      eta_s: float | None = None) -> str:
    """`iter 120/2000 | loss 2.1034 | lr 9.80e-04 | 33.1 ms/iter | 23,201 tok/s | mfu 1.23% |
    eta 1m02s` (mfu is a fraction, printed as a percentage; mfu and eta are left out when None)."""
    parts = [f"iter {iter}" + (f"/{max_iters}" if max_iters else ""), f"loss {loss:.4f}",
             f"lr {lr:.2e}", f"{ms_per_iter:.1f} ms/iter", f"{tokens_per_sec:,.0f} tok/s"]
    if mfu is not None:
        parts.append(f"mfu {mfu * 100:.2f}%")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def format_eval_line(iter: int, train_loss: float, val_loss: float,
                     train_bpb: float | None = None, val_bpb: float | None = None) -> str:
    """`eval 250: train loss 1.9543, val loss 2.0516 | bpb train 2.8195, val 2.9598` (the
    bits per byte left out when not measured)."""
    line = f"eval {iter}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
    if train_bpb is not None and val_bpb is not None:
        line += f" | bpb train {train_bpb:.4f}, val {val_bpb:.4f}"
    return line


# ---------------------------------------------------------------- reading

def finite_or_none(x: Any) -> Any:
    """JSON has no NaN/inf: store them as null (readers see None)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def metrics_path(path: str | Path) -> Path:
    """`<run_dir>/metrics.jsonl` for a run dir, or the path itself for a file."""
    path = Path(path)
    return path / METRICS_FILE if path.is_dir() else path


def parse_row(line: str | bytes) -> dict | None:
    """A metrics.jsonl line as a train or eval row; None for a line that is not a JSON object
    of a known kind (a line torn by a crash, say)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and row.get("kind") in ("train", "eval") else None


def _read_rows(path: Path) -> list[dict]:
    """The train and eval rows of a metrics.jsonl in file order; other lines are skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [row for row in map(parse_row, f) if row is not None]


def _split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    return ([r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"])


def read_metrics(path: str | Path) -> Metrics:
    """Read a run dir (its metrics.jsonl and, for the title, run.json) or a metrics.jsonl."""
    path = Path(path)
    file = metrics_path(path)
    if not file.is_file():
        raise DataError(f"{path} has no {METRICS_FILE}: give a run dir written by `folio train` "
                        f"(or a nanoGPT/folio console log file)")
    train, evals = _split(_read_rows(file))
    if not train and not evals:
        raise DataError(f"{file} has no metric rows yet: train for at least one log_interval")
    run_dir = file.parent
    return Metrics(train, evals, name=run_dir.name if path.is_dir() else file.stem,
                   info=_run_info(run_dir))


def _run_info(run_dir: Path) -> RunInfo | None:
    """The run's run.json, or None when it is missing or unreadable (plots must not need it)."""
    try:
        return read_run_info(run_dir)
    except CheckpointError:
        return None


# ---------------------------------------------------------------- parsing console logs

_NUM = r"[-+]?(?:\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
NANOGPT_TRAIN = re.compile(rf"\biter (\d+): loss ({_NUM}), time ({_NUM})ms(?:, mfu ({_NUM})%)?")
NANOGPT_EVAL = re.compile(rf"\bstep (\d+): train loss ({_NUM}), val loss ({_NUM})")
FOLIO_TRAIN = re.compile(
    rf"\biter (\d+)(?:/\d+)? \| loss ({_NUM}) \| lr ({_NUM}) \| ({_NUM}) ms/iter"
    rf" \| ({_NUM}) tok/s(?: \| mfu ({_NUM})%)?")
FOLIO_EVAL = re.compile(rf"\beval (\d+): train loss ({_NUM}), val loss ({_NUM})"
                        rf"(?: \| bpb train ({_NUM}), val ({_NUM}))?")
EXPECTED_LINES = ("nanoGPT `iter 3347: loss 3.4083, time 147.35ms, mfu 0.10%` / "
                  "`step 250: train loss 1.9543, val loss 2.0516`, or folio "
                  "`iter 120/2000 | loss 2.1034 | lr 9.80e-04 | 33.1 ms/iter | 23,201 tok/s ...` / "
                  "`eval 250: train loss 1.9543, val loss 2.0516`")


def _num(s: str | None) -> float | None:
    return None if s is None else float(s.replace(",", ""))


def _parse_line(line: str) -> dict | None:
    """One console line as a train or eval row (tokens/time_s not filled yet), else None."""
    if m := FOLIO_TRAIN.search(line):
        it, loss, lr, ms, tps, mfu = m.groups()
        return {"kind": "train", "iter": int(it), "loss": _num(loss), "lr": _num(lr),
                "ms_per_iter": _num(ms), "tokens_per_sec": _num(tps),
                "mfu": None if mfu is None else _num(mfu) / 100}
    if m := NANOGPT_TRAIN.search(line):
        it, loss, ms, mfu = m.groups()
        mfu_frac = None if mfu is None or _num(mfu) < 0 else _num(mfu) / 100  # -100% = unknown
        return {"kind": "train", "iter": int(it), "loss": _num(loss), "lr": None,
                "ms_per_iter": _num(ms), "tokens_per_sec": None, "mfu": mfu_frac}
    if m := FOLIO_EVAL.search(line):
        it, train_loss, val_loss, train_bpb, val_bpb = m.groups()
        return {"kind": "eval", "iter": int(it), "train_loss": _num(train_loss),
                "val_loss": _num(val_loss), "train_bpb": _num(train_bpb),
                "val_bpb": _num(val_bpb)}
    if m := NANOGPT_EVAL.search(line):
        it, train_loss, val_loss = m.groups()
        return {"kind": "eval", "iter": int(it), "train_loss": _num(train_loss),
                "val_loss": _num(val_loss)}
    return None


def parse_log(text: str, name: str = "log") -> Metrics:
    """Rows from pasted nanoGPT or folio console output; other lines are skipped.

    Elapsed time and tokens seen are estimated (see `_fill_time_and_tokens`); tokens are None
    for nanoGPT lines.
    A restarted log (iter going back) keeps the last occurrence of each iteration.
    """
    rows = [r for line in re.split(r"[\r\n]+", text) if (r := _parse_line(line))]
    if not rows:
        raise DataError(f"no training log lines found in {name}; expected lines like "
                        f"{EXPECTED_LINES}")
    train = _dedupe([r for r in rows if r["kind"] == "train"])
    evals = _dedupe([r for r in rows if r["kind"] == "eval"])
    _fill_time_and_tokens(train, evals)
    return Metrics(train, evals, name=name)


def _dedupe(rows: list[dict]) -> list[dict]:
    """Sorted by iter; the last row seen wins (a resumed run re-logs iterations)."""
    return sorted({r["iter"]: r for r in rows}.values(), key=lambda r: r["iter"])


def _fill_time_and_tokens(train: list[dict], evals: list[dict]) -> None:
    """Estimate time_s and tokens for parsed rows.

    A log line's ms is the time of its own iteration only, which may include an eval or a
    compile, so the iterations before it are counted at the smaller of it and the previous
    line's ms. An eval at iter N starts after the last train line before N plus the
    iterations in between. Tokens per iteration are tok/s x ms (only folio lines say).
    """
    time_s, prev_iter, prev_ms = 0.0, 0, math.inf
    for r in train:
        ms = r["ms_per_iter"] or 0.0
        time_s += (ms + max(r["iter"] - prev_iter - 1, 0) * min(ms, prev_ms)) / 1000
        prev_iter, prev_ms = r["iter"], ms
        r["time_s"] = time_s
        r["tokens"] = _tokens_at(r["iter"], r)
    iters = [r["iter"] for r in train]
    for e in evals:
        i = bisect.bisect_left(iters, e["iter"]) - 1  # the last train line before the eval
        if i < 0:
            e["time_s"], e["tokens"] = 0.0, _tokens_at(e["iter"], train[0] if train else None)
            continue
        r = train[i]
        e["time_s"] = r["time_s"] + (e["iter"] - r["iter"]) * (r["ms_per_iter"] or 0.0) / 1000
        e["tokens"] = _tokens_at(e["iter"], r)


def _tokens_at(iter: int, row: dict | None) -> int | None:
    """Tokens seen after `iter` iterations at the batch size of train `row` (folio lines)."""
    if row is None or row["tokens_per_sec"] is None:
        return None
    return int(round(iter * row["tokens_per_sec"] * row["ms_per_iter"] / 1000))


# ---------------------------------------------------------------- writing

class _Console:
    """Progress output: a tqdm bar under the log lines on a terminal, plain lines otherwise."""

    def __init__(self, max_iters: int | None):
        self.max_iters = max_iters
        self.tty = sys.stdout.isatty()
        self.bar = None

    def line(self, text: str, iter: int) -> None:
        if not self.tty:
            print(text, flush=True)
            return
        if self.bar is None:  # started at the first line, so a resumed run's rate is right
            from tqdm import tqdm
            self.bar = tqdm(total=self.max_iters, initial=iter, unit="it", dynamic_ncols=True,
                            leave=False, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                                    "[{elapsed}<{remaining}, {rate_fmt}]")
        self.bar.write(text)
        self.bar.update(iter - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """Appends train/eval rows to `<run_dir>/metrics.jsonl`, prints progress lines, refreshes
    `loss.png` after each eval, and forwards to wandb / TensorBoard when enabled.

    `wandb_cfg`: {"project", "name", "config", "id"} for `wandb.init` (an id resumes that run).
    The loss.png title comes from the run dir's run.json, when there is one.
    Rows already in metrics.jsonl (a resumed run) are kept; call `truncate_after(iter)` first
    to drop rows logged after the checkpoint being resumed. Use on rank 0 only.
    """

    def __init__(self, run_dir: Path, *, console: bool = True, wandb_cfg: dict | None = None,
                 tensorboard: bool = False, plot_every_eval: bool = True,
                 max_iters: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.max_iters = max_iters
        self.file = self._open_for_append()
        self.wandb = _start_wandb(wandb_cfg, self.run_dir) if wandb_cfg is not None else None
        self.tb = _start_tensorboard(self.run_dir) if tensorboard else None
        self.console = _Console(max_iters) if console else None
        self.plotter = None
        if plot_every_eval:
            self.plotter = BackgroundRefresh(self.run_dir)

    def _open_for_append(self):
        f = open(self.path, "a", encoding="utf-8")
        # A crash can leave a torn last line: start the next row on its own line.
        if f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, 2)
                if r.read(1) != b"\n":
                    f.write("\n")
        return f

    def _append(self, row: dict) -> None:
        # Flushed per line: `folio plot` and the loss.png refresher read the file while it grows.
        self.file.write(json.dumps({k: finite_or_none(v) for k, v in row.items()}) + "\n")
        self.file.flush()

    def log_train(self, iter: int, tokens: int, time_s: float, loss: float, lr: float,
                  ms_per_iter: float, tokens_per_sec: float, mfu: float | None) -> None:
        """One progress row; `mfu` is a fraction of peak (None when the device peak is unknown)."""
        row = {"kind": "train", "iter": iter, "tokens": tokens, "time_s": time_s, "loss": loss,
               "lr": lr, "ms_per_iter": ms_per_iter, "tokens_per_sec": tokens_per_sec, "mfu": mfu}
        self._append(row)
        if self.console:
            eta = ((self.max_iters - iter) * ms_per_iter / 1000) if self.max_iters else None
            self.console.line(format_train_line(iter, self.max_iters, loss, lr, ms_per_iter,
                                                tokens_per_sec, mfu, eta), iter)
        if self.wandb:
            self.wandb.log({"train/loss": loss, "train/lr": lr, "train/ms_per_iter": ms_per_iter,
                            "train/tokens_per_sec": tokens_per_sec, "train/mfu": mfu,
                            "tokens": tokens}, step=iter)
        if self.tb:
            for key in ("loss", "lr", "ms_per_iter", "tokens_per_sec", "mfu"):
                if row[key] is not None:
                    self.tb.add_scalar(f"train/{key}", row[key], iter)

    def log_eval(self, iter: int, tokens: int, time_s: float, train_loss: float,
                 val_loss: float, train_bpb: float | None = None,
                 val_bpb: float | None = None) -> None:
        """One evaluation row (bits per byte None when not measured); also asks the
        background process to redraw loss.png."""
        row = {"kind": "eval", "iter": iter, "tokens": tokens, "time_s": time_s,
               "train_loss": train_loss, "val_loss": val_loss, "train_bpb": train_bpb,
               "val_bpb": val_bpb}
        self._append(row)
        if self.console:
            self.console.line(format_eval_line(iter, train_loss, val_loss, train_bpb, val_bpb),
                              iter)
        values = {k: row[k] for k in EVAL_KEYS[3:] if row[k] is not None}
        if self.wandb:
            self.wandb.log({**{f"eval/{k}": v for k, v in values.items()}, "tokens": tokens},
                           step=iter)
        if self.tb:
            for key, value in values.items():
                self.tb.add_scalar(f"eval/{key}", value, iter)
            self.tb.flush()
        if self.plotter:
            self.plotter.request()

    def truncate_after(self, iter: int) -> None:
        """Drop rows with iter > `iter` (resuming from a checkpoint at `iter`); atomic rewrite."""
        self.file.close()
        rows = [r for r in _read_rows(self.path) if r["iter"] <= iter]
        fsutil.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self.file = self._open_for_append()

    def close(self) -> None:
        """Flush everything; wait for the final loss.png; finish wandb / TensorBoard."""
        if not self.file.closed:
            self.file.close()
        if self.plotter:
            self.plotter.close()
            self.plotter = None
        if self.console:
            self.console.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_wandb(cfg: dict, run_dir: Path):
    wandb = need("wandb", "wandb", "wandb_log=True")
    try:
        run_id = cfg.get("id")  # set when resuming: continue that run
        return wandb.init(project=cfg.get("project", "folio"), name=cfg.get("name"),
                          config=cfg.get("config"), dir=str(run_dir), id=run_id,
                          resume="allow" if run_id else None)
    except wandb.errors.Error as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"wandb could not start ({first_line}): run `wandb login`, or set "
                          f"WANDB_MODE=offline to log locally") from None


def _start_tensorboard(run_dir: Path):
    tensorboard = need("torch.utils.tensorboard", "tensorboard", "tensorboard=True", "tensorboard")
    return tensorboard.SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
