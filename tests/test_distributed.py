"""torchrun on the CPU: two gloo processes over loopback, against one process and each other.

Every launch is a real `python -m torch.distributed.run --standalone --nproc_per_node=2 -m folio
train ...` of a tiny model, bounded by a timeout. A 1-process run that sees the same data
(`single_run`) is the reference the 2-process runs are compared with.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from folio.cli.args import parse_args
from folio.config import TrainConfig
from folio.data.loader import Loader
from folio.errors import TrainingError
from folio.machine.distributed import DistInfo
from folio.store import checkpoint, rundir, sources
from folio.store.rundir import read_run_info
from folio.train.loop import Trainer

LAUNCH_TIMEOUT_S = 120
SETTINGS = dict(max_iters=30, lr_decay_iters=30, eval_interval=10, log_interval=1,
                gradient_accumulation_steps=2, batch_size=8, dropout=0.0)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "folio", "train"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`folio train` in two processes; fails the test with their output if it fails."""
    done = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def worker_tracebacks(stderr: str) -> list[str]:
    """Tracebacks printed by folio's processes (torchrun prefixes their lines with [rankN])."""
    return [line for line in stderr.splitlines() if re.match(r"\[rank\d\]:.*Traceback", line)]


def metrics(run_dir: Path) -> dict[tuple[str, int], float]:
    """{(kind, iter): loss} from a run's metrics.jsonl (the val loss for eval rows)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["kind"], r["iter"]): r["loss"] if r["kind"] == "train" else r["val_loss"]
            for r in rows}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


def max_weight_difference(a: Path, b: Path) -> float:
    """Between the latest weights (resume.safetensors) of two runs."""
    wa, wb = checkpoint.load_resume(a).model, checkpoint.load_resume(b).model
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


class RankStreams:
    """Micro-step k draws from the stream that rank k draws from in a 2-process run."""

    def __init__(self, loaders: list[Loader]):
        self.loaders, self.calls = loaders, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.loaders[(self.calls - 1) % len(self.loaders)].next_batch()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.loaders[0].state_dict()


@pytest.fixture(scope="module")
def single_run(char_data_dir, tmp_path_factory) -> Path:
    """The 1-process reference: 2 accumulated micro-steps of 8, on the real Trainer, in-process.

    Each DDP rank draws its own stream (seed + rank), so this run draws its micro-step k from
    a loader seeded seed + k: a 2-process run with one micro-step per rank then averages the
    gradients of the same 16 sequences per step, from the same initial weights (no dropout).
    """
    out = tmp_path_factory.mktemp("dist") / "single"
    cfg = parse_args(TrainConfig, tiny_args(char_data_dir, out, **SETTINGS)).config
    trainer = Trainer(cfg, DistInfo(), torch.device("cpu"))
    trainer.loader = RankStreams([
        Loader(trainer.eval_splits["train"], cfg.batch_size, cfg.block_size, cfg.seed + rank,
               trainer.device, "train") for rank in range(2)])
    assert trainer.run() == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(char_data_dir, tmp_path_factory) -> tuple[Path, str]:
    """A 2-process DDP run (one micro-step of 8 per rank) stopped at 20 and resumed to 30."""
    out = tmp_path_factory.mktemp("dist") / "ddp"
    args = tiny_args(char_data_dir, out, **SETTINGS)
    first = torchrun(*args, "--max_iters=20")
    assert "2 processes" in first.stdout
    return out, torchrun(*args, "--init_from=resume").stdout


def train_losses(run_dir: Path, first: int, last: int) -> dict[tuple[str, int], float]:
    return {k: v for k, v in metrics(run_dir).items() if k[0] == "train" and first <= k[1] <= last}


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(single_run, ddp_run):
    """The logged loss is the mean over every micro-batch of every rank, so both runs log the
    same numbers up to float rounding (the all-reduce adds in another order). Eval losses are
    not compared: each DDP rank evaluates its own fixed batches (twice the data)."""
    ddp, _ = ddp_run
    difference = max_difference(train_losses(ddp, 1, 20), train_losses(single_run, 1, 20))
    print(f"\n1 vs 2 processes, iters 1-20: max loss difference {difference:.2e}")
    assert difference < 1e-5


@pytest.mark.slow
def test_two_process_run_resumes_where_it_stopped(single_run, ddp_run):
    """Every rank's data stream and RNG state are saved, so the resumed run is exact."""
    ddp, resumed_stdout = ddp_run
    assert "iters 20->30" in resumed_stdout
    difference = max_difference(train_losses(ddp, 21, 30), train_losses(single_run, 21, 30))
    print(f"\nresumed 2 processes vs 1, iters 21-30: max loss difference {difference:.2e}, "
          f"max final weight difference {max_weight_difference(ddp, single_run):.2e}")
    assert difference < 1e-5
    assert max_weight_difference(ddp, single_run) < 1e-5
    assert ("eval", 30) in metrics(ddp)


@pytest.mark.slow  # two processes under torchrun
def test_two_process_evals_sum_bits_per_byte_over_ranks(ddp_run):
    """Each rank scores its own batches; their summed loss, tokens and bytes make the bpb
    (tiny Shakespeare is ASCII: the val loss / ln 2), and run.json keeps the best after a
    resume."""
    ddp, _ = ddp_run
    rows = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-5)
    best = min(evals, key=lambda r: r["val_loss"])
    assert read_run_info(ddp).best_val_bpb == pytest.approx(best["val_bpb"])


def run_twice_and_compare(args: list[str], out: Path, single: Path, tolerance: float) -> None:
    """Two processes train 20 iterations, resume to 30; losses and weights match `single`."""
    torchrun(*args, "--max_iters=20")
    torchrun(*args, "--init_from=resume")
    difference = max_difference(train_losses(out, 1, 30), train_losses(single, 1, 30))
    print(f"\n{out.name} vs 1 process: max loss difference {difference:.2e}")
    assert difference < tolerance
    assert max_weight_difference(out, single) < tolerance


@pytest.mark.slow
def test_fsdp_run_trains_resumes_and_loads_in_one_process(single_run, char_data_dir, tmp_path):
    """FSDP2 shards (per block; the root holds the tied embedding) train like one process;
    the gathered checkpoint resumes under FSDP and loads as a plain model in one process."""
    out = tmp_path / "fsdp"
    run_twice_and_compare(tiny_args(char_data_dir, out, fsdp=True, **SETTINGS), out, single_run,
                          tolerance=1e-5)

    model, tokenizer, info = sources.load_model(out)
    assert info.world_size == 2 and info.config["fsdp"] is True
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    with torch.no_grad():
        for _ in range(8):  # greedy decoding: the weights are usable for sampling
            logits = model(idx)  # (1, V_padded)
            idx = torch.cat([idx, logits[:, :tokenizer.vocab_size].argmax(-1, True)], 1)
    assert len(tokenizer.decode(idx[0].tolist())) == len("ROMEO:") + 8


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_once_and_every_process_exits(char_data_dir, tmp_path):
    """torchrun forwards SIGTERM (what a scheduler sends); the ranks agree to stop together,
    gather and save one checkpoint, and exit without tracebacks."""
    out = tmp_path / "stopped"
    args = tiny_args(char_data_dir, out, max_iters=100_000, eval_interval=100_000,
                     gradient_accumulation_steps=2)
    proc = subprocess.Popen([*TORCHRUN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    log = out / "metrics.jsonl"
    while not (log.exists() and '"kind": "train"' in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert stderr.count("folio: got SIGTERM") == 2
    assert "folio: saved" in stderr
    assert worker_tracebacks(stderr) == []
    # saved where the ranks stopped: at or after the last logged row (one every log_interval=5)
    saved = checkpoint.load_resume(out).iter_num
    last_row = max(i for kind, i in metrics(out) if kind == "train")
    assert last_row <= saved < last_row + 5
    assert f"at iter {saved};" in stderr and rundir.read_run_info(out).iter_num == saved


@pytest.mark.slow
def test_an_error_in_one_process_ends_all_with_one_line(char_data_dir, tmp_path):
    """Only rank 0 checks out_dir: its one-line error ends it; the other process, left alone
    in a collective, stops too (torchrun's failure summary follows)."""
    (tmp_path / "file").write_text("not a directory")
    args = tiny_args(char_data_dir, tmp_path / "file" / "run", gradient_accumulation_steps=2)
    done = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S, env=ENV)
    assert done.returncode != 0
    assert "folio: error: cannot write to out_dir" in done.stderr
    assert worker_tracebacks(done.stderr) == []


def test_accumulation_not_divisible_by_the_process_count_is_rejected(char_data_dir, tmp_path):
    cfg = parse_args(TrainConfig, tiny_args(char_data_dir, tmp_path,
                                            gradient_accumulation_steps=3)).config
    with pytest.raises(TrainingError, match="gradient_accumulation_steps=3 is not divisible"):
        Trainer(cfg, DistInfo(rank=0, world_size=2, local_world_size=2), torch.device("cpu"))


MODERN = dict(SETTINGS, recipe="modern", muon_momentum_warmup=10)


def modern_single_run(char_data_dir, out: Path) -> Path:
    """The 1-process reference of a --recipe=modern run (Muon + AdamW), as `single_run`."""
    from folio.train.recipes import resolve
    parsed = parse_args(TrainConfig, tiny_args(char_data_dir, out, **MODERN))
    cfg = resolve(parsed.config, parsed.given, "cpu")[0]
    trainer = Trainer(cfg, DistInfo(), torch.device("cpu"))
    trainer.loader = RankStreams([
        Loader(trainer.eval_splits["train"], cfg.batch_size, cfg.block_size, cfg.seed + rank,
               trainer.device, "train") for rank in range(2)])
    assert trainer.run() == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_modern_recipe_with_muon_trains_and_resumes_like_one_process(char_data_dir, tmp_path,
                                                                      fsdp):
    """Muon under DDP (averaged gradients) and FSDP2 (each update gathered whole, applied to
    the shards): the same losses and weights as one process, across a resume."""
    single = modern_single_run(char_data_dir, tmp_path / "single")
    out = tmp_path / "dist"
    run_twice_and_compare(tiny_args(char_data_dir, out, fsdp=fsdp, **MODERN), out, single,
                          tolerance=1e-4)
    assert checkpoint.load_resume(out).optimizer["state"]  # Muon's and AdamW's state were saved
