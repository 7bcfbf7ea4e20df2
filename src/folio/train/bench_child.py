"""`folio bench`'s child process (speed/bench.py starts one per path): it builds a Trainer
with the path's knobs, then answers `N` with N steps' times and `end` with its peak memory, or
(quality runs) trains and reports the val loss."""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from folio.config import AUTO, TrainConfig
from folio.errors import FolioError
from folio.machine.device import configure_allocator, dtype_name
from folio.machine.distributed import DistInfo
from folio.speed.bench import PLANNED_ITERS, RESULT_MARK, Case
from folio.speed.kernels import Kernels
from folio.train.loop import Trainer


def child_main(argv: list[str]) -> int:
    """Build the trainer, then (timing) answer `N` with N steps' times and `end` with the
    peak memory, or (quality, `iters` > 0) train and report the val loss."""

    spec = json.loads(argv[0])
    case, iters = Case(**spec["case"]), spec["iters"]
    with tempfile.TemporaryDirectory(prefix="folio-bench-run-") as out_dir:
        try:
            trainer, setup = build_trainer(case, spec["knobs"], Path(spec["data_dir"]), iters,
                                           out_dir)
        except FolioError as e:  # e.g. a variant asking for what this machine lacks
            reply({"error": str(e)})
            return 2
        if iters:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                trainer.run()
            reply({**setup, "iters": iters, "val_loss": round(trainer.progress.best_val_loss, 4),
                   "seconds": round(time.perf_counter() - t0, 1)})
            return 0
        t0 = time.perf_counter()
        for i in range(case.warmup):
            trainer.step(i)
        reply({**setup, "warmup_s": round(time.perf_counter() - t0, 2),
               "gflops_per_iter": round(trainer.flops_per_iter / 1e9, 3)})
        i = case.warmup
        for request in sys.stdin:
            if request.strip() == "end":
                reply({"peak_rss_mb": peak_rss_mb()})
                return 0
            times = []
            for _ in range(int(request)):
                t0 = time.perf_counter()
                loss = trainer.step(i)
                times.append(time.perf_counter() - t0)
                i += 1
            reply({"times": times, "loss": round(loss.item(), 4)})
    return 0


def reply(result: dict) -> None:
    print(RESULT_MARK + json.dumps(result), flush=True)


def build_trainer(case: Case, knobs: dict[str, str], data_dir: Path, iters: int, out_dir: str):
    """A Trainer for `case` with the path's knobs, and what the path turned out to use."""
    if knobs["allocator"] == "1":
        configure_allocator()
    cfg = TrainConfig(
        dataset=case.dataset, data_dir=str(data_dir), out_dir=out_dir, device="cpu",
        n_layer=case.n_layer, n_head=case.n_head, n_embd=case.n_embd,
        block_size=case.block_size, batch_size=case.batch_size, dropout=case.dropout,
        bias=False, dtype=knobs["dtype"], compile=knobs["compile"],
        # a path with knobs on auto plans a 2,000-step run, so its trainer measures its choice
        # as `folio train` would (the measuring is part of the set-up, not of the timed steps)
        max_iters=iters or (PLANNED_ITERS if AUTO in knobs.values() else 1),
        lr_decay_iters=iters or 2000, eval_interval=iters or 1,
        eval_iters=50, log_interval=max(1, iters // 10), warmup_iters=100 if iters else 0,
        learning_rate=1e-3, beta2=0.99, min_lr=1e-4)  # nanoGPT's tiny-Shakespeare recipe
    # kernels on auto are left to the trainer (measured), explicit ones are given
    kernels = None if AUTO in (knobs["fused_loss"], knobs["fast_dropout"]) else \
        Kernels(fused_loss=knobs["fused_loss"] == "1", fast_dropout=knobs["fast_dropout"] == "1")
    with contextlib.redirect_stdout(sys.stderr):
        trainer = Trainer(cfg, DistInfo(), torch.device("cpu"), kernels)
    tuning = trainer.tuning
    return trainer, {"dtype": dtype_name(trainer.dtype),
                     "choice": tuning.line if tuning else None,
                     "tuning_s": round(tuning.tuning_s, 2) if tuning else 0.0,
                     "compile": trainer.compiled, "fused_loss": trainer.kernels.fused_loss,
                     "fast_dropout": trainer.kernels.fast_dropout,
                     "threads": torch.get_num_threads()}


def peak_rss_mb() -> int:
    """This process's peak resident memory (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10))


if __name__ == "__main__":  # a Child
    sys.exit(child_main(sys.argv[1:]))
