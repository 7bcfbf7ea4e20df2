"""Choose the speed knobs left on `auto` by timing a few real training steps of each candidate.

The caller builds the candidates (model, optimizer, real batches) and gives one timing callable
per candidate; here they take turns in rounds within a budget, the fastest numerically safe one
wins, and the decision is cached per machine and model shape under $FOLIO_CACHE/autotune/.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from folio.fsutil import atomic_write_json, cache_dir

CACHE_VERSION = 3  # 2: CPU attention in float32 under bf16, the Newton-Schulz knob; 3: the
# fused loss became one softmax per logit (faster: earlier choices of the logits loss are stale)
BUDGET_S = 10.0  # never measure longer than this...
RUN_FRACTION = 0.02  # ...nor longer than this share of the planned run
MAX_ROUNDS = 5  # timed rounds (each candidate a few steps per round) when the budget allows
MIN_ROUNDS = 3  # over budget_s, while within run_fraction: one step can be an unlucky one
SLOW_FIRST_STEP = 2.0  # a candidate whose first step took this many times the fastest's is out
MIN_GAIN = 1.02  # leave the reference only for a candidate this much faster (noise margin)
LOSS_TOLERANCE = 0.02  # relative difference from the reference's loss that is still "safe"
# /proc/cpuinfo flags that change which kernels (and so which choice) are fastest
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
               "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve",
               "bf16", "i8mm")


@dataclass(frozen=True)
class Measurement:
    """What a timing callable reports for the steps it just ran."""

    seconds: list[float]  # wall time of each step
    loss: float  # the last step's training loss


TimeSteps = Callable[[int], Measurement]  # run n training steps of one candidate


@dataclass(frozen=True)
class Choice:
    """The chosen candidate and how it was decided."""

    name: str
    knobs: dict[str, Any]
    line: str  # for the log, e.g. "bfloat16: 1.90x float32, measured"
    speedup: float = 1.0  # steps/s over the reference candidate's
    cached: bool = False
    tuning_s: float = 0.0  # time spent measuring (0 when cached or not measured)
    ms_per_step: dict[str, float | None] = field(default_factory=dict)  # None: dropped early


def cpu_identity() -> dict[str, Any]:
    """The CPU's model and the instruction-set flags that decide which kernels are fast."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "stepping", "flags",
                           "Features", "CPU part") and key not in info:
                    info[key] = value.strip()
                if not line.strip() and info:
                    break  # the first processor's block is enough
    except OSError:
        pass
    flags = set((info.get("flags") or info.get("Features") or "").split())
    name = info.get("model name") or platform.processor() or platform.machine()
    version = "/".join(info[k] for k in ("cpu family", "model", "stepping", "CPU part")
                       if k in info)
    return {"model": f"{name} ({version})" if version else name,
            "flags": sorted(flags & set(SPEED_FLAGS)),
            "capability": torch.backends.cpu.get_cpu_capability()}


def cache_key(shape: Mapping[str, Any], batch: Mapping[str, Any], device_type: str,
              candidates: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Everything a decision depends on: machine, torch, model shape, batch, candidates."""
    return {"cpu": cpu_identity() if device_type == "cpu" else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": device_type, "shape": dict(shape), "batch": dict(batch),
            "candidates": {name: dict(knobs) for name, knobs in candidates.items()}}


def cache_path(key: Mapping[str, Any], root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return (root or cache_dir() / "autotune") / f"{digest}.json"


def choose(candidates: Mapping[str, Mapping[str, Any]], build: Callable[[str], TimeSteps],
           key: Mapping[str, Any], planned_steps: int | None, *, reference: str | None = None,
           budget_s: float = BUDGET_S, run_fraction: float = RUN_FRACTION,
           tolerance: float = LOSS_TOLERANCE, cache_root: Path | None = None,
           may_measure: bool = True, planned_s: float | None = None) -> Choice:
    """The fastest safe candidate, from the cache or measured (without `may_measure`, the
    reference where nothing is cached); `build(name)` gives its timer.

    `candidates` maps a name to its knob settings (only the knobs left on auto: the caller
    never passes an explicit setting); `reference` (default: the first) is the baseline the
    others must match in loss and beat in speed. One candidate is returned without measuring.
    """
    reference = reference or next(iter(candidates))
    if len(candidates) == 1:
        return Choice(reference, dict(candidates[reference]), f"{reference}: set")
    path = cache_path(key, cache_root)
    cached = _read_cached(path, key, candidates)
    if cached is not None:
        return cached
    if not may_measure:
        return unmeasured(candidates, reference)
    started = time.perf_counter()
    stats = measure({name: build(name) for name in candidates}, reference, planned_steps,
                    budget_s, run_fraction, planned_s)
    tuning_s = time.perf_counter() - started
    name, speedup = pick(stats, reference, tolerance)
    ms = {n: round(s.ms_per_step, 2) if s.seconds else None for n, s in stats.items()}
    note = "measured" if name != reference else _why_reference(stats, reference, tolerance)
    choice = Choice(name, dict(candidates[name]), _line(name, speedup, reference, note),
                    speedup, False, tuning_s, ms)
    with contextlib.suppress(OSError):  # unwritable cache: measure again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {
            "version": CACHE_VERSION, "key": dict(key), "choice": name, "reference": reference,
            "speedup": speedup, "ms_per_step": ms, "tuning_s": round(tuning_s, 2),
            "losses": {n: s.loss if s.seconds else None for n, s in stats.items()},
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")})
    return choice


def unmeasured(candidates: Mapping[str, Mapping[str, Any]], reference: str | None = None
               ) -> Choice:
    """The reference candidate (default: the first), taken without measuring."""
    reference = reference or next(iter(candidates))
    return Choice(reference, dict(candidates[reference]), f"{reference}: not measured")


@dataclass
class Stats:
    """One candidate's timed steps (warm-up excluded) and its last loss."""

    seconds: list[float] = field(default_factory=list)
    loss: float = math.nan

    @property
    def ms_per_step(self) -> float:
        # the fastest step: on a shared machine interference only ever adds time (as timeit)
        return min(self.seconds) * 1000 if self.seconds else math.inf


def measure(timers: Mapping[str, TimeSteps], reference: str, planned_steps: int | None,
            budget_s: float, run_fraction: float, planned_s: float | None = None
            ) -> dict[str, Stats]:
    """Time the candidates in interleaved rounds so a drift in machine speed hits all alike.

    A first untimed step each (allocations, first-touch) estimates the step times: candidates
    SLOW_FIRST_STEP times slower than the fastest are not timed further (the reference always
    is: the others' losses are checked against its), and the rounds are sized to fit
    min(budget_s, run_fraction x the planned run), at least MIN_ROUNDS of one step where that
    fits run_fraction, else one.
    """
    started = time.perf_counter()
    step_s = {name: sum(timer(1).seconds) for name, timer in timers.items()}  # warm-up
    fastest = min(step_s.values())
    timed = {name: timer for name, timer in timers.items()
             if name == reference or step_s[name] <= SLOW_FIRST_STEP * fastest}
    planned = [] if planned_steps is None else [planned_steps * fastest]  # the run's seconds
    planned += [] if planned_s is None else [planned_s]
    run_share = run_fraction * min(planned) if planned else budget_s
    spent = time.perf_counter() - started
    round_step_s = max(sum(step_s[name] for name in timed), 1e-9)  # one step of each
    steps = max(1, min(3, int((min(budget_s, run_share) - spent) / (MAX_ROUNDS * round_step_s))))
    rounds = int((min(budget_s, run_share) - spent) / (steps * round_step_s))
    floor = MIN_ROUNDS if spent + MIN_ROUNDS * round_step_s <= run_share else 1
    stats = {name: Stats() for name in timers}
    for _ in range(max(floor, min(MAX_ROUNDS, rounds))):
        for name, timer in timed.items():
            result = timer(steps)
            stats[name].seconds += result.seconds
            stats[name].loss = result.loss
    return stats


def pick(stats: Mapping[str, Stats], reference: str, tolerance: float) -> tuple[str, float]:
    """(name, speedup over the reference) of the fastest safe candidate."""
    ref = stats[reference]
    best, best_ms = reference, ref.ms_per_step
    for name, s in stats.items():
        if name != reference and _safe(s.loss, ref.loss, tolerance) \
                and s.ms_per_step * MIN_GAIN < ref.ms_per_step and s.ms_per_step < best_ms:
            best, best_ms = name, s.ms_per_step
    return best, round(ref.ms_per_step / best_ms, 2)


def _safe(loss: float, reference_loss: float, tolerance: float) -> bool:
    """Finite, and within `tolerance` (relative) of the reference's loss after the same steps."""
    return (math.isfinite(loss) and math.isfinite(reference_loss)
            and abs(loss - reference_loss) <= tolerance * max(1.0, abs(reference_loss)))


def _why_reference(stats: Mapping[str, Stats], reference: str, tolerance: float) -> str:
    unsafe = [n for n, s in stats.items()
              if s.seconds and not _safe(s.loss, stats[reference].loss, tolerance)]
    return "measured" + (f"; rejected {', '.join(unsafe)} (loss off)" if unsafe else "")


def _line(name: str, speedup: float, reference: str, note: str) -> str:
    if name == reference:
        return f"{name}: fastest, {note}"
    return f"{name}: {speedup:.2f}x {reference}, {note}"


def _read_cached(path: Path, key: Mapping[str, Any], candidates: Mapping[str, Mapping[str, Any]]
                 ) -> Choice | None:
    """The cached decision for `key`, or None when missing, corrupt or about other candidates."""
    try:
        with open(path) as f:
            saved = json.load(f)
        name, reference = saved["choice"], saved["reference"]
        if saved["version"] != CACHE_VERSION or saved["key"] != json.loads(json.dumps(key)) \
                or name not in candidates:
            return None
        date = str(saved["measured_at"])[:10]
        speedup = float(saved["speedup"])
        line = _line(name, speedup, reference, f"cached {date}")
        return Choice(name, dict(candidates[name]), line, speedup, True, 0.0,
                      dict(saved.get("ms_per_step", {})))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe(knobs: Mapping[str, Any]) -> str:
    """A short name for a candidate's knobs: 'bfloat16', 'float32 + compile', ..."""
    parts = [str(knobs.get("dtype", ""))]
    for knob, value in knobs.items():
        if knob != "dtype":
            parts.append(knob.replace("_", " ") if value else f"no {knob.replace('_', ' ')}")
    return " + ".join(p for p in parts if p)

