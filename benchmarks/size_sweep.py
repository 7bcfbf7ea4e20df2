"""Which model trains best in a time budget: a sweep of sizes x budgets with `--time`.

For each dataset (char: tiny Shakespeare character-level; bpe: tiny Shakespeare in GPT-2 BPE)
and each budget, `folio train --time=T` trains each depth of sizing.py's dial (d layers, 32·d
wide) with the modern recipe, one process at a time, exactly as a user runs it (the budget
counts imports, set-up and evaluations). One JSON line per run (final val loss, iterations,
tokens, wall time, tokens per parameter) and one per budget with the best depth; with
--plot, val loss against depth for each budget (the frontier) is drawn to docs/size_sweep.png.
The rule in sizing.py (TOKENS_PER_PARAM) is read off these lines. Run it alone:

    python benchmarks/size_sweep.py --datasets char --budgets 60,180 --depths 2,3,4,5,6 --plot

The context and regularisation runs in docs/training.md are single cells of it, e.g.
`--datasets char --budgets 600 --depths 3 --block char=256,bpe=64 --weight_decay 0.1`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"char": "shakespeare_char", "bpe": "shakespeare"}


def run(dataset: str, depth: int, budget_s: int, data_dir: Path, out_dir: Path,
        block: int, batch: int, dropout: float, weight_decay: float) -> dict:
    """One `folio train --time` run of the dial's model at `depth`; its figures."""
    args = [sys.executable, "-m", "folio", "train", f"--dataset={dataset}",
            f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--time={budget_s}s",
            f"--n_layer={depth}", f"--n_head={depth}", f"--n_embd={32 * depth}",
            f"--block_size={block}", f"--batch_size={batch}", f"--dropout={dropout}",
            f"--weight_decay={weight_decay}",
            "--device=cpu", "--recipe=modern", "--log_interval=1000000"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    info = json.loads((out_dir / "run.json").read_text())
    evals = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    tokens = info["iter_num"] * batch * block
    return {"val_loss": info["best_val_loss"], "final_val_loss": evals[-1]["val_loss"],
            "train_loss": evals[-1]["train_loss"], "iters": info["iter_num"],
            "tokens": tokens, "params": info.get("n_params"),
            "tokens_per_param": round(tokens / max(1, info.get("n_params") or 1), 1),
            "wall_s": round(wall, 1), "choice": (info.get("tuning") or {}).get("choice")}


def plot(lines: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({line["dataset"] for line in lines}), figsize=(10, 4),
                             squeeze=False)
    for ax, dataset in zip(axes[0], sorted({line["dataset"] for line in lines}), strict=False):
        for budget in sorted({line["budget_s"] for line in lines if line["dataset"] == dataset}):
            rows = sorted((line for line in lines if line["dataset"] == dataset
                           and line["budget_s"] == budget and "val_loss" in line),
                          key=lambda line: line["depth"])
            ax.plot([r["depth"] for r in rows], [r["val_loss"] for r in rows], marker="o",
                    label=f"--time={budget}s")
        ax.set_title(f"tiny Shakespeare, {dataset}: best val loss by depth")
        ax.set_xlabel("depth d (d layers, 32·d wide)")
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="char,bpe")
    parser.add_argument("--budgets", default="60,180", help="seconds, comma-separated")
    parser.add_argument("--depths", default="2,3,4,5,6")
    parser.add_argument("--block", default="char=128,bpe=64")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--data_dir", default="", help="prepared datasets (default: a temp dir)")
    parser.add_argument("--plot", action="store_true", help="draw docs/size_sweep.png")
    args = parser.parse_args()
    blocks = dict(item.split("=") for item in args.block.split(","))
    import torch

    from folio.machine.device import cpu_supports_bf16, measured_cpu_matmul_flops
    from folio.speed.autotune import cpu_identity
    from folio.speed.bench import bench_data_dir
    machine = {"cpu": cpu_identity(), "torch": torch.__version__,
               "peak_gflops": round(measured_cpu_matmul_flops(
                   torch.bfloat16 if cpu_supports_bf16() else torch.float32) / 1e9, 1)}
    print(json.dumps({"machine": machine}), flush=True)
    lines = []
    names = [DATASETS[d] for d in args.datasets.split(",")]
    with bench_data_dir(args.data_dir, set(names)) as data_dir, \
            tempfile.TemporaryDirectory(prefix="folio-sweep-") as tmp:
        os.environ.setdefault("FOLIO_CACHE", str(Path(tmp) / "cache"))
        for kind in args.datasets.split(","):
            for budget in (int(b) for b in args.budgets.split(",")):
                best = None
                for depth in (int(d) for d in args.depths.split(",")):
                    out = Path(tmp) / f"{kind}-{budget}-{depth}"
                    result = run(DATASETS[kind], depth, budget, data_dir, out,
                                 int(blocks[kind]), args.batch, args.dropout,
                                 args.weight_decay)
                    line = {"dataset": kind, "budget_s": budget, "depth": depth, **result}
                    lines.append(line)
                    print(json.dumps(line), flush=True)
                    if "val_loss" in line and (best is None or line["val_loss"] < best["val_loss"]):
                        best = line
                if best:
                    print(json.dumps({"dataset": kind, "budget_s": budget, "best_depth":
                                      best["depth"], "best_val_loss": best["val_loss"],
                                      "tokens_per_param": best["tokens_per_param"]}), flush=True)
    if args.plot:
        plot(lines, REPO / "docs" / "size_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
