"""The runs a server shows: found in the watched directories, summarised for the page, and
their models loaded once and kept in a least-recently-used pool.

Requests name runs only by the names `RunIndex` gives them, so no request can build a path.
A run dir that is being written or is corrupt is summarised with its error, never raised.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from folio.data.tokenizer import Tokenizer
from folio.errors import FolioError
from folio.infer.sample import load_run
from folio.model.gpt import GPT
from folio.speed.decoding import for_decoding
from folio.store.guard import is_training
from folio.store.rundir import (
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILE,
    NANOGPT_CKPT,
    RESUME_FILE,
    RUN_INFO,
    RunInfo,
    has_weights,
    read_run_info,
)
from folio.store.sources import kind_of
from folio.watch.metrics import parse_row

RECENT_S = 120.0  # metrics.jsonl written this recently: training (for trainers without .lock)
MAX_METRICS_CHUNK = 4 << 20  # bytes of metrics.jsonl sent per request
PLANNED_TOKENS = 10_000  # what a loaded model is expected to decode: sizes the fast-path measuring


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in (RUN_INFO, METRICS_FILE, NANOGPT_CKPT))


class RunIndex:
    """Run names -> run dirs: the given dirs plus every run dir directly under `runs_dir`.

    Rescanned on demand (cheap), so a run started after the server shows up.
    """

    def __init__(self, run_dirs: list[str], runs_dir: str = "") -> None:
        self.run_dirs = [Path(d).expanduser().resolve() for d in run_dirs]
        self.runs_dir = Path(runs_dir).expanduser().resolve() if runs_dir else None
        self._runs: dict[str, Path] = {}
        self.scan()

    def scan(self) -> dict[str, Path]:
        found = [d for d in self.run_dirs if d.is_dir()]
        if self.runs_dir is not None and self.runs_dir.is_dir():
            if is_run_dir(self.runs_dir):
                found.append(self.runs_dir)
            try:
                found += sorted(d for d in self.runs_dir.iterdir()
                                if d.is_dir() and not d.name.startswith(".") and is_run_dir(d))
            except OSError:
                pass
        runs: dict[str, Path] = {}
        for d in dict.fromkeys(found):  # first occurrence wins, order kept
            name, k = d.name, 2
            while name in runs:
                name, k = f"{d.name}-{k}", k + 1
            runs[name] = d
        self._runs = runs
        return runs

    def get(self, name: str) -> Path | None:
        """The run dir called `name`, or None (names are keys, never joined into paths)."""
        return self._runs.get(name) or self.scan().get(name)

    def names(self) -> list[str]:
        return list(self.scan())


# ---------------------------------------------------------------------------- status

def run_status(run_dir: Path, info: RunInfo | None) -> str:
    """training | finished | interrupted.

    A trainer that holds `.lock` is training; without a `.lock` file (older trainers), an
    unfinished run whose metrics.jsonl changed in the last RECENT_S seconds counts as training.
    """
    if is_training(run_dir):
        return "training"
    if _finished(info):
        return "finished"
    if not (run_dir / LOCK_FILE).exists():
        try:
            if time.time() - (run_dir / METRICS_FILE).stat().st_mtime < RECENT_S:
                return "training"
        except OSError:
            pass
    return "interrupted"


def _finished(info: RunInfo | None) -> bool:
    if info is None:
        return False
    max_iters = info.config.get("max_iters")
    return isinstance(max_iters, int) and info.iter_num == max_iters


def summarise(name: str, run_dir: Path) -> dict[str, Any]:
    """What the runs table shows; `error` says why a run cannot be loaded (yet)."""
    summary: dict[str, Any] = {"name": name, "error": None}
    info: RunInfo | None = None
    try:
        info = read_run_info(run_dir)
    except FolioError as e:
        if kind_of(run_dir) == "folio":  # nanoGPT and Hugging Face dirs have no run.json
            summary["error"] = str(e).replace(str(run_dir), name)
    if info is not None:
        config = info.config
        summary.update(model=info.model, dataset=info.dataset or config.get("dataset"),
                       chat=info.chat_template is not None,
                       iter=info.iter_num, max_iters=config.get("max_iters"),
                       best_val_loss=info.best_val_loss, best_val_bpb=info.best_val_bpb,
                       config=config)
        if not has_weights(run_dir):
            summary["error"] = "no weights saved yet"
    summary["status"] = run_status(run_dir, info)
    return summary


def read_metrics_chunk(run_dir: Path, offset: int) -> dict[str, Any]:
    """Rows of metrics.jsonl from byte `offset` to the last complete line, and the next offset.

    A file shorter than `offset` was rewritten (a resumed run drops rows after its checkpoint):
    everything is sent again with `reset` true. Torn or foreign lines are skipped.
    """
    path = run_dir / METRICS_FILE
    try:
        size = path.stat().st_size
        reset = offset > size or offset < 0
        start = 0 if reset else offset
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(MAX_METRICS_CHUNK)
    except OSError:
        return {"rows": [], "offset": 0, "reset": offset != 0}
    end = data.rfind(b"\n") + 1  # an unfinished last line waits for the next call
    rows = [row for row in map(parse_row, data[:end].splitlines()) if row is not None]
    return {"rows": rows, "offset": start + end, "reset": reset}


# ---------------------------------------------------------------------------- models

@dataclass
class LoadedModel:
    name: str
    model: GPT
    tokenizer: Tokenizer
    info: RunInfo
    stamp: tuple  # weights files' mtimes when loaded: newer weights are loaded again


class ModelPool:
    """Models loaded once per run and reused; beyond `capacity`, the least recently used
    is dropped (a generation still using it keeps it alive until it ends)."""

    def __init__(self, index: RunIndex, capacity: int, device: str = "auto",
                 dtype: str = "auto") -> None:
        self.index, self.capacity, self.device, self.dtype = index, capacity, device, dtype
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # one load at a time; loads are rare and slow

    def get(self, name: str) -> LoadedModel:
        """The loaded model of run `name` (KeyError: no such run; FolioError: cannot load)."""
        run_dir = self.index.get(name)
        if run_dir is None:
            raise KeyError(name)
        stamp = _weights_stamp(run_dir)
        with self._lock:
            loaded = self._models.get(name)
            if loaded is None or loaded.stamp != stamp:
                model, tokenizer, info = load_run(run_dir, self.device, self.dtype)
                model, _ = for_decoding(model, self.dtype, PLANNED_TOKENS)
                loaded = LoadedModel(name, model, tokenizer, info, stamp)
                self._models[name] = loaded
            self._models.move_to_end(name)
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return loaded

    def ready(self, name: str) -> LoadedModel | None:
        """Run `name`'s model if it is loaded with its newest weights, else None (`get`
        loads it): at once, no load and no wait for one, so the event loop may call it."""
        run_dir = self.index.get(name)
        if run_dir is None or not self._lock.acquire(blocking=False):
            return None
        try:
            loaded = self._models.get(name)
            if loaded is None or loaded.stamp != _weights_stamp(run_dir):
                return None
            self._models.move_to_end(name)
            return loaded
        finally:
            self._lock.release()

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._models)


def _weights_stamp(run_dir: Path) -> tuple:
    stamp = []
    for name in (MODEL_FILE, RESUME_FILE, NANOGPT_CKPT):
        try:
            stamp.append((run_dir / name).stat().st_mtime_ns)
        except OSError:
            stamp.append(None)
    return tuple(stamp)
