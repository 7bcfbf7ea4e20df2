"""Time to reach nanoGPT's loss: the nanoGPT recipe against `--recipe=modern`, in one run.

For each shape (char: nanoGPT README's CPU model; bpe: the seed's GPT-2-vocabulary shape) it
trains (a) the nanoGPT recipe for 2,000 iterations, (b) the modern recipe on a short schedule
(time to (a)'s final val loss) and (c) the modern recipe with as many iterations as fit in
(a)'s training time (best val loss in the same wall time). Every run evaluates on the SAME
fixed val batches (`--eval_batches`, default 100) every `--eval_every` iterations; eval time
is not counted. Both run as `folio train` does on a CPU with dtype=float32: the CPU fast path,
its knobs measured on the run's own model (for Muon also the Newton-Schulz dtype), no compile,
denormals flushed.
Prints one JSON line per run and one per shape (the ratios); `--ablation` adds modern runs
with one piece switched back at a time. Run it alone, under the shared lock:

    flock /tmp/folio-cpu.lock python benchmarks/time_to_loss.py --ablation
    python benchmarks/time_to_loss.py --shapes char --runs-dir runs/  # keep the run dirs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from folio.config import TrainConfig, apply
from folio.machine.device import configure_allocator, flush_denormals
from folio.machine.distributed import DistInfo
from folio.speed.autotune import cpu_identity
from folio.speed.bench import bench_data_dir
from folio.train.evaluate import estimate_loss
from folio.train.loop import Trainer
from folio.train.recipes import resolve

SHAPES = {  # nanoGPT's recipe at each shape (the shakespeare_char_cpu preset for char)
    "char": dict(dataset="shakespeare_char", n_layer=4, n_head=4, n_embd=128, block_size=64,
                 batch_size=12),
    "bpe": dict(dataset="shakespeare", n_layer=4, n_head=4, n_embd=64, block_size=64,
                batch_size=8),
}
NANOGPT = dict(dropout=0.0, learning_rate=1e-3, beta2=0.99, warmup_iters=100, min_lr=1e-4,
               bias=False, max_iters=2000)
ABLATION = {  # one piece of the modern recipe switched back to nanoGPT's
    "no_muon": dict(optimizer="adamw", learning_rate=3e-3),
    "no_rope": dict(rope=False),
    "no_relu2": dict(mlp="gelu"),
    "no_qk_norm": dict(qk_norm=False),
    "cosine": dict(lr_schedule="cosine", warmup_iters=0),
}


def make_config(shape: str, data_dir: Path, out_dir: str, modern: bool, **changes) -> TrainConfig:
    values = {**SHAPES[shape], **NANOGPT, "data_dir": str(data_dir), "out_dir": out_dir,
              "device": "cpu", "dtype": "float32", "compile": False, "eval_iters": 1,
              "log_interval": 10**9, "eval_interval": 10**9, "seed": 1337}
    # a modern run drops nanoGPT's optimizer settings so the recipe fills them in
    recipe_keys = ("learning_rate", "warmup_iters", "min_lr") if modern else ()
    values = {k: v for k, v in values.items() if k not in recipe_keys}
    given = {**values, "recipe": "modern" if modern else "nanogpt", **changes}
    return resolve(apply(TrainConfig, given), frozenset(given), "cpu")[0]


def train(cfg: TrainConfig, eval_every: int, eval_batches: int, seconds: float = 0.0,
          split: str = "val") -> dict:
    """Train cfg.max_iters iterations (or until `seconds` of training time); evaluate the fixed
    val batches at 0, every eval_every and at the end. Returns the run's curve and timings."""
    with contextlib.redirect_stdout(sys.stderr):
        trainer = Trainer(cfg, DistInfo(), torch.device("cpu"))  # knobs on auto: measured
    val = {"val": trainer.eval_splits[split]}  # "val" names the split evaluated

    def evaluate() -> float:
        return estimate_loss(trainer.model, val, eval_batches, cfg.batch_size, cfg.block_size,
                             trainer.device, contextlib.nullcontext,
                             max_tokens=trainer.eval_tokens)["val"].loss

    curve = [(0, 0.0, evaluate())]
    losses = []  # (iter, training seconds, training loss)
    train_s, i = 0.0, 0
    while i < cfg.max_iters and not (seconds and train_s >= seconds):
        t0 = time.perf_counter()
        loss = trainer.step(i)
        train_s += time.perf_counter() - t0
        i += 1
        losses.append((i, round(train_s, 3), round(loss.item(), 4)))
        if i % eval_every == 0 or i == cfg.max_iters:
            curve.append((i, round(train_s, 3), round(evaluate(), 4)))
    if curve[-1][0] != i:
        curve.append((i, round(train_s, 3), round(evaluate(), 4)))
    if trainer.metrics is not None:
        trainer.metrics.close()
    return {"iters": i, "train_s": round(train_s, 2), "ms_per_iter": round(1000 * train_s / i, 2),
            "cpu_path": trainer.tuning.line if trainer.tuning else None,
            "final_val": curve[-1][2], "best_val": min(v for _, _, v in curve), "curve": curve,
            "losses": losses}


def interleaved_step_ratio(configs: list[TrainConfig], rounds: int = 6, steps: int = 10
                           ) -> list[float]:
    """Median ms per step of each config, their trainers taking turns in blocks of `steps`
    (after one warmup block), so load from other processes falls on all of them alike."""
    with contextlib.redirect_stdout(sys.stderr):
        trainers = [Trainer(c, DistInfo(), torch.device("cpu")) for c in configs]
    times: list[list[float]] = [[] for _ in trainers]
    for r in range(rounds + 1):
        for t, ts in zip(trainers, times, strict=True):
            for i in range(steps):
                t0 = time.perf_counter()
                t.step(r * steps + i)
                if r:
                    ts.append(time.perf_counter() - t0)
    return [round(1000 * sorted(ts)[len(ts) // 2], 2) for ts in times]


def first_reaching(curve: list, target: float) -> tuple[int, float] | tuple[None, None]:
    """(iterations, training seconds) of the first eval at or below target."""
    return next(((it, s) for it, s, v in curve if it and v <= target), (None, None))


def write_metrics(run_dir: Path, result: dict, cfg: TrainConfig) -> None:
    """The run as a run dir metrics.jsonl (train and eval lines), so `folio plot` draws it;
    time_s counts training time only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tokens = cfg.batch_size * cfg.block_size
    with open(run_dir / "metrics.jsonl", "w") as f:
        for it, s, loss in result["losses"]:
            f.write(json.dumps({"kind": "train", "iter": it, "tokens": it * tokens, "time_s": s,
                                "loss": loss}) + "\n")
        for it, s, v in result["curve"]:
            f.write(json.dumps({"kind": "eval", "iter": it, "tokens": it * tokens, "time_s": s,
                                "train_loss": None, "val_loss": v}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="char,bpe")
    parser.add_argument("--modern-iters", default="char=400,bpe=600",
                        help="the modern recipe's short schedule per shape")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=100)
    parser.add_argument("--same-time", default="char,bpe",
                        help="shapes that also get the modern run as long as nanoGPT's")
    parser.add_argument("--steps-only", action="store_true",
                        help="only the interleaved step times of both recipes per shape")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--ablation-shape", default="char")
    parser.add_argument("--sweep", default="",
                        help="instead: tune the modern recipe on the TRAIN split, e.g. "
                        "muon_lr=0.02,0.03,0.05 (one setting, its values)")
    parser.add_argument("--runs-dir", default="", help="write each run's eval curve here")
    parser.add_argument("--data-dir", default="")
    args = parser.parse_args()
    configure_allocator()  # what `folio train` does on a CPU, for both recipes
    flush_denormals()
    shapes = [s for s in args.shapes.split(",") if s]
    short = dict(kv.split("=") for kv in args.modern_iters.split(","))
    host = {"cpu": cpu_identity(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    print(json.dumps({"host": host}), flush=True)
    datasets = {SHAPES[s]["dataset"] for s in [*shapes, args.ablation_shape]}
    with bench_data_dir(args.data_dir, datasets) as data_dir, \
            tempfile.TemporaryDirectory(prefix="folio-ttl-") as tmp:
        def run(name: str, shape: str, modern: bool, seconds: float = 0.0, **changes) -> dict:
            cfg = make_config(shape, data_dir, f"{tmp}/{shape}-{name}", modern, **changes)
            result = train(cfg, args.eval_every, args.eval_batches, seconds)
            if args.runs_dir:
                write_metrics(Path(args.runs_dir) / f"{shape}-{name}", result, cfg)
            line = {"shape": shape, "run": name, **{k: v for k, v in result.items()
                                                     if k not in ("curve", "losses")}}
            print(json.dumps(line), flush=True)
            return result

        if args.sweep:
            key, values = args.sweep.split("=")
            for shape in shapes:
                for value in values.split(","):
                    cfg = make_config(shape, data_dir, f"{tmp}/{shape}-{value}", True,
                                      max_iters=int(short[shape]), **{key: value})
                    result = train(cfg, int(short[shape]), args.eval_batches, split="train")
                    print(json.dumps({"shape": shape, "sweep": key, "value": value,
                                      "train_split_loss": result["final_val"],
                                      "ms_per_iter": result["ms_per_iter"]}), flush=True)
            return 0
        def step_times(shape: str) -> list[float]:
            return interleaved_step_ratio([
                make_config(shape, data_dir, f"{tmp}/{shape}-ia", False),
                make_config(shape, data_dir, f"{tmp}/{shape}-ib", True,
                            max_iters=int(short[shape]))])

        for shape in shapes if args.steps_only else []:
            a, b = step_times(shape)
            print(json.dumps({"shape": shape, "interleaved_ms": {"nanogpt": a, "modern": b},
                              "interleaved_step_ratio": round(b / a, 3)}), flush=True)
        for shape in [] if args.steps_only else shapes:
            n = int(short[shape])
            base = run("nanogpt", shape, False)
            target = base["final_val"]
            fast = run(f"modern_{n}", shape, True, max_iters=n)
            it, s = first_reaching(fast["curve"], target)
            same = {"best_val": None}
            if shape in args.same_time.split(","):
                fit = int(base["train_s"] / (fast["train_s"] / fast["iters"]))
                same = run("modern_same_time", shape, True, seconds=base["train_s"],
                           max_iters=fit)
            a, b = step_times(shape)
            print(json.dumps({
                "shape": shape, "target_val": target,
                "interleaved_ms": {"nanogpt": a, "modern": b},
                "interleaved_step_ratio": round(b / a, 3),
                "iter_ratio_x_interleaved_step_ratio": round(it / base["iters"] * b / a, 3)
                if it else None, "nanogpt_s": base["train_s"],
                "nanogpt_iters": base["iters"], "modern_iters_to_target": it,
                "modern_s_to_target": s,
                "wall_ratio": round(s / base["train_s"], 3) if s else None,
                "iter_ratio": round(it / base["iters"], 3) if it else None,
                "step_ratio": round(fast["ms_per_iter"] / base["ms_per_iter"], 3),
                "modern_best_val_in_nanogpt_time": same["best_val"],
                "nanogpt_best_val": base["best_val"]}), flush=True)
        if args.ablation:
            shape, n = args.ablation_shape, int(short[args.ablation_shape])
            for name, changes in ABLATION.items():
                run(f"ablate_{name}", shape, True, max_iters=n, **changes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
