"""`folio bench`: training speed on this CPU, the plain eager path against folio's default.

Each case trains the same model on the same batches twice, each path in its own subprocess
(train/bench_child.py, a Trainer answering timing requests) so peak memory and allocator
settings never mix. The processes take turns (a few steps each,
never at once) so that drifts in the machine's speed, common on shared or throttling
hardware, hit both paths alike. One JSON line per case gives both paths and the ratios:
`speedup` (tokens/s), `rss_ratio` (peak memory) and `speedup_ceiling`, the speedup the second
path would show if all its FLOPs ran at this CPU's measured matmul peak, i.e. how much room
the hardware leaves.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from folio.config import BenchConfig, PrepareConfig
from folio.errors import ConfigError

# In a source checkout the tests carry tiny Shakespeare; an installed folio downloads it.
REPO_TEXT = Path(__file__).resolve().parents[3] / "tests" / "data" / "tinyshakespeare" / "input.txt"
PLANNED_ITERS = 2000  # the run a path with knobs on auto plans, so its trainer measures
RESULT_MARK = "FOLIO_BENCH_RESULT "
QUALITY_TOLERANCE = 0.02
ROUNDS = 5  # turns each path takes (fewer when a case has fewer timed steps)


@dataclass(frozen=True)
class Case:
    """One model shape and batch, as a nanoGPT command line would give it."""

    dataset: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    dropout: float
    steps: int  # timed steps by default
    warmup: int  # untimed first steps (compilation, first-touch allocations)

    @property
    def tokens_per_iter(self) -> int:
        return self.batch_size * self.block_size  # one micro-batch per step


CASES = {
    # the seed user's BPE command: 4 layers, 64 wide, GPT-2's 50,257-token vocabulary
    "seed_bpe": Case("shakespeare", 4, 4, 64, 64, 8, 0.0, steps=20, warmup=2),
    # nanoGPT's README CPU command
    "cpu_char": Case("shakespeare_char", 4, 4, 128, 64, 12, 0.0, steps=50, warmup=3),
    # nanoGPT's GPU char config (config/train_shakespeare_char.py) run on the CPU
    "gpu_char": Case("shakespeare_char", 6, 6, 384, 256, 64, 0.2, steps=3, warmup=1),
}

# A path is a set of knobs; "eager" is nanoGPT's math, "fast" is what `folio train` picks.
PATHS = {
    "eager": {"dtype": "float32", "compile": "False", "fused_loss": "0", "fast_dropout": "0",
              "allocator": "0"},
    "fast": {"dtype": "auto", "compile": "auto", "fused_loss": "auto", "fast_dropout": "auto",
             "allocator": "1"},
}
KNOBS = tuple(PATHS["eager"])


def bench(cfg: BenchConfig) -> int:
    """`folio bench`: prints one JSON line per case (and one for cfg.quality)."""
    cases = list(CASES) if cfg.cases == "all" else [c.strip() for c in cfg.cases.split(",")
                                                     if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ConfigError(f"unknown case {unknown[0]!r} in --cases; choose from "
                          f"{', '.join(CASES)} or all")
    variants = parse_variants(cfg.variants)
    datasets = {CASES[c].dataset for c in cases} | ({"shakespeare_char"} if cfg.quality else set())
    with bench_data_dir(cfg.data_dir, datasets) as data_dir:
        for name in cases:
            case = CASES[name]
            if cfg.steps:
                case = Case(**{**asdict(case), "steps": cfg.steps})
            results = time_paths(case, variants, data_dir, name)
            print(json.dumps(summarise(name, case, results)), flush=True)
        if cfg.quality:
            print(json.dumps(quality(data_dir, cfg.quality_iters, variants)), flush=True)
    return 0


def describe_cases() -> str:
    """The cases, one line each, for `folio bench --help`."""
    return "\n".join(f"  {name:<10} {c.n_layer} layers, {c.n_embd} wide, {c.dataset}, batch "
                     f"{c.batch_size}x{c.block_size}, {c.steps} timed steps"
                     for name, c in CASES.items())


def parse_variants(spec: str) -> dict[str, dict[str, str]]:
    """'eager,fast:compile=True' -> {label: knobs}."""
    variants = {}
    for label in (v.strip() for v in spec.split(",") if v.strip()):
        base, _, changes = label.partition(":")
        if base not in PATHS:
            raise ConfigError(f"--variants: {base!r} is not a path; use eager or fast")
        knobs = dict(PATHS[base])
        for change in filter(None, changes.split(":")):
            key, eq, value = change.partition("=")
            if key not in KNOBS or not eq:
                raise ConfigError(f"--variants: bad change {change!r}; use KNOB=VALUE with a "
                                  f"knob among {', '.join(KNOBS)}")
            knobs[key] = value
        variants[label] = knobs
    if not variants:
        raise ConfigError("--variants is empty; use e.g. --variants eager,fast")
    return variants


@contextlib.contextmanager
def bench_data_dir(data_dir: str, datasets: set[str]):
    """A data dir with tiny Shakespeare prepared at the character and GPT-2 BPE levels.

    The text comes from FOLIO_CACHE when set, else from the copy in a source checkout's tests/data
    (seeded into a temporary cache), else from folio's usual download cache.
    """
    from folio.data.prepare import cache_dir, prepare
    with tempfile.TemporaryDirectory(prefix="folio-bench-") as tmp:
        if not os.environ.get("FOLIO_CACHE") and REPO_TEXT.is_file():
            seeded = Path(tmp) / "cache" / "tinyshakespeare"
            seeded.mkdir(parents=True)
            shutil.copy(REPO_TEXT, seeded / "input.txt")
            os.environ["FOLIO_CACHE"] = str(seeded.parent)
        root = Path(data_dir) if data_dir else cache_dir() / "bench-data"
        for dataset in datasets:
            if not (root / dataset / "meta.json").is_file():
                with contextlib.redirect_stdout(sys.stderr):
                    prepare(PrepareConfig(dataset=dataset, data_dir=str(root)))
        yield root


class ChildFailed(Exception):
    pass


class Child:
    """One path's process: it builds its trainer, then answers one request per line."""

    def __init__(self, case: Case, knobs: dict[str, str], data_dir: Path, iters: int = 0):
        spec = {"case": asdict(case), "knobs": knobs, "data_dir": str(data_dir), "iters": iters}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "folio.train.bench_child", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.output: list[str] = []

    def answer(self, request: str | None = None) -> dict:
        """Send `request` (if any) and wait for the child's next result line."""
        if request is not None:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])
            self.output.append(line)
        code = self.proc.wait()
        sys.stderr.write("".join(self.output[-20:]))
        raise ChildFailed(f"exit code {code}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def time_paths(case: Case, variants: dict[str, dict[str, str]], data_dir: Path, name: str
               ) -> dict[str, dict]:
    """Time each path's steps, the paths taking turns in rounds; {label: result}.

    Between rounds, while the paths wait, this process measures the matmul peak of each
    path's dtype; the best figure over the rounds is the peak for MFU and the ceiling.
    """
    from folio.machine.device import configure_threads
    configure_threads()  # for the peak measurements in this process
    rounds = min(ROUNDS, case.steps)
    per_round = [case.steps // rounds + (r < case.steps % rounds) for r in range(rounds)]
    children, results, times, peaks = {}, {}, {}, {}
    try:
        for label, knobs in variants.items():  # one at a time: warm-ups never overlap
            print(f"folio bench: {name} {label} ...", file=sys.stderr, flush=True)
            children[label] = Child(case, knobs, data_dir)
            results[label], times[label] = _ask(children[label]), []
        for steps in per_round:
            for label, child in children.items():
                if "error" not in results[label]:
                    answer = results[label] = {**results[label], **_ask(child, str(steps))}
                    times[label] += answer.pop("times", [])
            for dtype in {r["dtype"] for r in results.values() if "error" not in r}:
                peaks[dtype] = max(peaks.get(dtype, 0.0), matmul_peak(dtype))
        for label, child in children.items():
            if "error" not in results[label]:
                result = {**results[label], **_ask(child, "end")}
                results[label] = step_figures(result, times[label], peaks[result["dtype"]],
                                              case.tokens_per_iter)
    finally:
        for child in children.values():
            child.close()
    return results


def matmul_peak(dtype: str) -> float:
    """FLOP/s of a 2048^2 matmul in `dtype` on this CPU, best of 3 (uncached: speed drifts)."""
    import torch

    from folio.machine.device import cpu_matmul_flops
    return cpu_matmul_flops(getattr(torch, dtype), n=2048, repeats=3)


def _ask(child: Child, request: str | None = None) -> dict:
    try:
        return child.answer(request)
    except (ChildFailed, BrokenPipeError) as e:
        return {"error": str(e)}


def step_figures(result: dict, times: list[float], peak: float, tokens: int) -> dict:
    """ms/iter (median over all timed steps), tokens/s and MFU against `peak` FLOP/s."""
    seconds = statistics.median(times)
    flops = result["gflops_per_iter"] * 1e9
    return {**result, "steps": len(times), "ms_per_iter": round(seconds * 1000, 1),
            "min_ms_per_iter": round(min(times) * 1000, 1),
            "tokens_per_sec": round(tokens / seconds),
            "mfu": round(flops / seconds / peak, 4), "peak_gflops": round(peak / 1e9, 1)}


def summarise(name: str, case: Case, results: dict[str, dict]) -> dict:
    """One JSON-able line: the case, each path's numbers, and fast / eager ratios."""
    line = {"case": name, "tokens_per_iter": case.tokens_per_iter, **results,
            **machine_figures()}
    labels = list(results)
    if len(labels) >= 2 and not any("error" in results[k] for k in labels[:2]):
        base, new = results[labels[0]], results[labels[1]]
        line["speedup"] = round(new["tokens_per_sec"] / base["tokens_per_sec"], 2)
        line["rss_ratio"] = round(new["peak_rss_mb"] / base["peak_rss_mb"], 2)
        # what the second path would reach if every FLOP ran at the measured matmul peak
        bound_ms = new["gflops_per_iter"] / new["peak_gflops"] * 1000
        line["speedup_ceiling"] = round(base["ms_per_iter"] / bound_ms, 2)
    return line


def machine_figures() -> dict:
    """The CPU (model, speed flags) and torch a line was measured on: never mix machines."""
    import torch

    from folio.speed.autotune import cpu_identity
    return {"cpu": cpu_identity(), "torch": torch.__version__}


def quality(data_dir: Path, iters: int, variants: dict[str, dict[str, str]]) -> dict:
    """Final val loss of cpu_char after `iters` iterations on each path (issue 9, item 3)."""
    case = CASES["cpu_char"]
    losses = {}
    for label, knobs in variants.items():
        print(f"folio bench: quality {label} ...", file=sys.stderr, flush=True)
        child = Child(case, knobs, data_dir, iters=iters)
        losses[label] = _ask(child)
        child.close()
    line: dict = {"case": "cpu_char_quality", "iters": iters, **machine_figures(),
                  **{label: {k: v.get(k) for k in ("val_loss", "dtype", "compile", "seconds")}
                     for label, v in losses.items()}}
    first = [v.get("val_loss") for v in losses.values()][:2]
    if len(first) == 2 and None not in first:
        diff = abs(first[1] - first[0])
        line.update(val_loss_diff=round(diff, 4), within_tolerance=diff <= QUALITY_TOLERANCE)
    return line
