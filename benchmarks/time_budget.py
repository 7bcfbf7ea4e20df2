"""The best model in a time budget: `folio train --time=T` against nanoGPT's recipe, same machine.

One after another, alone on the machine:
- folio: `folio train --time=T` for each T (default 1, 3 and 10 minutes), as a user runs it:
  the modern recipe, the size chosen for the budget, the budget counting imports, set-up,
  the speed measurement and evaluations. Its best val loss and how long it really took.
- nanoGPT: its README CPU command (folio's nanoGPT-recipe path, which matches nanoGPT's
  train.py step for step: 4 x 128, block 64, batch 12, 2,000 iterations), evaluated every
  `--eval_every` iterations (250, as its command does) with wall times, evaluations included
  as in folio's budget; for each T, its best val loss within T.
- nanoGPT's GPU config (`shakespeare_char`: 6 x 384, block 256, batch 64, 5,000 iterations,
  val 1.4697 on an A100 in its README): the time it would take on this CPU, from its
  measured step time (`--gpu_steps` steps after one warm-up).
Both evaluate val loss on 20 batches (nanoGPT README's CPU eval_iters). Since folio's char
model reads 256 tokens of context and nanoGPT's CPU model 64, each run's best model is also
scored on the same 1,600 val windows of 64 tokens (`..._at_block_64`). JSON lines, the CPU
named:

    python benchmarks/time_budget.py --budgets 60,180,600
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CPU = ["--dataset=shakespeare_char", "--n_layer=4", "--n_head=4", "--n_embd=128",
               "--block_size=64", "--batch_size=12", "--max_iters=2000", "--lr_decay_iters=2000",
               "--dropout=0.0", "--learning_rate=1e-3", "--beta2=0.99", "--warmup_iters=100",
               "--min_lr=1e-4", "--eval_iters=20", "--log_interval=1000000",
               "--compile=False", "--device=cpu"]


def folio_train(args: list[str], out_dir: Path, data_dir: Path) -> tuple[float, list[dict],
                                                                         dict, str]:
    """Run `folio train ARGS`; (wall seconds, eval rows, run.json, first line)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "folio", "train", *args,
                           f"--out_dir={out_dir}", f"--data_dir={data_dir}"],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"folio train failed: {proc.stderr.strip()}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((out_dir / "run.json").read_text())
    return wall, [r for r in rows if r["kind"] == "eval"], info, proc.stdout.splitlines()[0]


def val_loss_at_block(run_dir: Path, data_dir: Path, block: int, batches: int = 100,
                      batch: int = 16) -> float:
    """The run's best model's mean val loss on windows of `block` tokens (nanoGPT README CPU's
    context is 64; a longer context lowers a model's mean loss, so this compares like with
    like). Fixed windows: the same for every run."""
    import numpy as np
    import torch

    import folio as api
    model, _ = api.load(str(run_dir), device="cpu", dtype="float32")
    val = np.memmap(data_dir / "shakespeare_char" / "val.bin", dtype=np.uint16, mode="r")
    starts = torch.randint(len(val) - block - 1, (batches, batch),
                           generator=torch.Generator().manual_seed(0))
    losses = []
    with torch.no_grad():
        for row in starts:
            xy = torch.stack([torch.from_numpy(val[i:i + block + 1].astype(np.int64))
                              for i in row.tolist()])
            losses.append(model(xy[:, :-1], xy[:, 1:]).item())
    return round(sum(losses) / len(losses), 4)


def gpu_config_seconds(data_dir: Path, steps: int) -> dict:
    """nanoGPT's shakespeare_char config timed for `steps` steps on this CPU, as it would
    run (nanoGPT recipe, float32 eager: no folio fast path)."""
    import torch

    from folio.cli.args import parse_args
    from folio.config import TrainConfig
    from folio.machine.distributed import DistInfo
    from folio.speed.kernels import PLAIN
    from folio.train.loop import Trainer
    from folio.train.recipes import resolve
    with tempfile.TemporaryDirectory() as out:
        parsed = parse_args(TrainConfig, ["shakespeare_char", f"--data_dir={data_dir}",
                                          f"--out_dir={out}", "--device=cpu", "--compile=False",
                                          "--dtype=float32"], config_file=True)
        cfg = resolve(parsed.config, parsed.given, "cpu", source=parsed.source)[0]
        trainer = Trainer(cfg, DistInfo(), torch.device("cpu"), PLAIN)
        trainer.step(0)  # warm-up
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.step(i + 1)
        step_s = (time.perf_counter() - t0) / steps
    return {"config": "shakespeare_char (nanoGPT GPU: 6x384, block 256, batch 64)",
            "s_per_step": round(step_s, 2), "iters": cfg.max_iters,
            "hours_for_5000_iters": round(step_s * cfg.max_iters / 3600, 1),
            "a100_val_loss": 1.4697}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="60,180,600", help="seconds, comma-separated")
    parser.add_argument("--eval_every", type=int, default=250,
                        help="nanoGPT run's eval interval (its README CPU command's: 250)")
    parser.add_argument("--gpu_steps", type=int, default=3)
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--runs_dir", default="", help="keep the run dirs here")
    args = parser.parse_args()
    import torch

    from folio.machine.device import cpu_supports_bf16, measured_cpu_matmul_flops
    from folio.speed.autotune import cpu_identity
    from folio.speed.bench import bench_data_dir
    machine = {"cpu": cpu_identity(), "torch": torch.__version__,
               "peak_gflops": round(measured_cpu_matmul_flops(
                   torch.bfloat16 if cpu_supports_bf16() else torch.float32) / 1e9, 1)}
    print(json.dumps({"machine": machine}), flush=True)
    budgets = [int(b) for b in args.budgets.split(",")]
    with bench_data_dir(args.data_dir, {"shakespeare_char"}) as data_dir, \
            tempfile.TemporaryDirectory(prefix="folio-budget-") as scratch:
        tmp = args.runs_dir or scratch
        nano_wall, nano_evals, _, _ = folio_train(
            [*NANOGPT_CPU, "--recipe=nanogpt", f"--eval_interval={args.eval_every}"],
            Path(tmp) / "nanogpt", data_dir)
        print(json.dumps({"run": "nanogpt_readme_cpu", "wall_s": round(nano_wall, 1),
                          "final_val_loss": nano_evals[-1]["val_loss"],
                          "iters": nano_evals[-1]["iter"]}), flush=True)
        nano_at_64 = val_loss_at_block(Path(tmp) / "nanogpt", data_dir, 64)
        for budget in budgets:
            wall, evals, info, first = folio_train(
                [f"--time={budget}s", "--device=cpu"], Path(tmp) / f"folio-{budget}", data_dir)
            # nanoGPT's best val within the same wall time (its clock: training time since
            # its start, plus the start-up folio's budget also pays, taken as equal)
            within = [e["val_loss"] for e in nano_evals if e["time_s"] <= budget]
            nano_best = min(within) if within else None
            line = {"budget_s": budget, "folio_val_loss": info["best_val_loss"],
                    "folio_wall_s": round(wall, 1), "over_budget": round(wall / budget - 1, 4),
                    "folio_iters": info["iter_num"], "folio_shape": {
                        k: info["model"][k] for k in ("n_layer", "n_head", "n_embd",
                                                      "block_size")},
                    "folio_first_line": first, "nanogpt_best_val_within": nano_best,
                    "gap": round(nano_best - info["best_val_loss"], 4) if nano_best else None,
                    "folio_val_loss_at_block_64": val_loss_at_block(
                        Path(tmp) / f"folio-{budget}", data_dir, 64),
                    "nanogpt_final_val_loss_at_block_64": nano_at_64}
            print(json.dumps(line), flush=True)
        print(json.dumps(gpu_config_seconds(data_dir, args.gpu_steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
