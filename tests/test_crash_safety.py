"""A run dir survives SIGKILL at any moment, a failed save and a NaN loss, and resumes exactly."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from folio.cli import main
from folio.store.checkpoint import load_resume
from folio.store.rundir import MODEL_FILE, RESUME_FILE, read_run_info
from folio.store.sources import load_model, model_config
from folio.store.weights import gpt_from_state
from folio.watch.metrics import read_metrics

KILLS = 24
MAX_KILLS = 72
# Evaluate and save at every iteration so that many kills land inside checkpoint writes.
HAMMER = dict(eval_interval=1, eval_iters=1, always_save_checkpoint=True, log_interval=1,
              lr_decay_iters=100_000, dropout=0.1)


def launch(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "folio", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def train_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count('"kind": "train"') if path.exists() else 0


def assert_finite(model: torch.nn.Module) -> None:
    assert all(torch.isfinite(p).all() for p in model.parameters())


def assert_loadable(out: Path) -> None:
    """Whatever moment the kill hit, what is on disk loads: the resume state builds the run's
    model, holds a step (saves come after one) and is never behind run.json (written after it)."""
    info = read_run_info(out) if (out / "run.json").exists() else None
    if (out / RESUME_FILE).exists():
        state = load_resume(out)
        assert state.iter_num >= 1
        assert info is not None and info.iter_num <= state.iter_num
        assert_finite(gpt_from_state(model_config(info, out), state.model, out / RESUME_FILE))
    if (out / MODEL_FILE).exists():
        assert_finite(load_model(out)[0])


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_an_unloadable_run(char_data_dir, tmp_path):
    rng = random.Random(7)
    out = tmp_path / "run"
    mid_write = kill = 0
    # at least KILLS kills, and more (bounded) until at least 3 hit a checkpoint write: where
    # a write lands in time depends on the machine's load
    while kill < KILLS or (mid_write < 3 and kill < MAX_KILLS):
        kill += 1
        resume = ["--init_from=resume"] if (out / RESUME_FILE).exists() else []
        before = train_rows(out)
        proc = launch([*tiny_args(char_data_dir, out, max_iters=100_000, **HAMMER), *resume])
        if kill % 4 == 0:  # some kills during start-up and resume loading
            time.sleep(rng.uniform(0.2, 1.5))
        else:  # most while training, evaluating and saving at every iteration
            deadline = time.monotonic() + 60
            while train_rows(out) <= before and time.monotonic() < deadline:
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        mid_write += any(out.glob(".*.tmp"))
        assert_loadable(out)
    print(f"{kill} kills survived, {mid_write} of them inside a checkpoint write")
    assert mid_write >= 3, "saves too fast to be hit: the test does not test writes"

    # Finish the run, then compare every logged loss with an uninterrupted run.
    stop = load_resume(out).iter_num + 5
    final = launch([*tiny_args(char_data_dir, out, max_iters=stop, **HAMMER),
                    "--init_from=resume"])
    assert final.wait(timeout=120) == 0, final.communicate()[1]
    reference = tmp_path / "reference"
    assert main(["train", *tiny_args(char_data_dir, reference, max_iters=stop, **HAMMER)]) == 0
    killed = {r["iter"]: r["loss"] for r in read_metrics(out).train}
    straight = {r["iter"]: r["loss"] for r in read_metrics(reference).train}
    assert list(killed) == list(range(1, stop + 1))
    assert killed == straight  # bitwise: resume after a kill is exact
    assert not list(out.glob(".*.tmp"))


def limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_full_disk_is_detected_before_training(char_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = launch(tiny_args(char_data_dir, out, max_iters=5), preexec_fn=limit_file_size(1000))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "cannot write to out_dir" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_failed_save_keeps_the_previous_checkpoint_and_says_why(char_data_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(char_data_dir, out, max_iters=4, eval_interval=2, always_save_checkpoint=True)
    assert main(["train", *args]) == 0
    before = {name: (out / name).read_bytes() for name in (MODEL_FILE, RESUME_FILE)}
    # Room for logs and the write probe, not for a new checkpoint: like a disk that filled up.
    size = (out / MODEL_FILE).stat().st_size
    proc = launch([*tiny_args(char_data_dir, out, max_iters=8, eval_interval=2,
                              always_save_checkpoint=True), "--init_from=resume"],
                  preexec_fn=limit_file_size(size // 2))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert "could not save a checkpoint" in stderr and "previous checkpoint is kept" in stderr
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob(".*.tmp"))
    assert load_resume(out).iter_num == 4


@pytest.mark.slow
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(char_data_dir, tmp_path,
                                                                    capsys):
    out = tmp_path / "run"
    good = tiny_args(char_data_dir, out, max_iters=4, eval_interval=2)
    assert main(["train", *good]) == 0
    weights = (out / MODEL_FILE).read_bytes()
    # An absurd learning rate without clipping drives the weights to inf within a few steps.
    code = main(["train", *tiny_args(char_data_dir, out, max_iters=40, eval_interval=2,
                                     learning_rate=1e9, grad_clip=0, warmup_iters=0,
                                     log_interval=1), "--init_from=resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert "at iter" in err and "learning_rate" in err
    assert (out / MODEL_FILE).read_bytes() == weights
    assert_loadable(out)


@pytest.mark.parametrize("payload_file", ["ckpt.pt"])
def test_malicious_pickle_checkpoint_is_refused_and_never_runs(tmp_path, payload_file, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = tmp_path / "nanogpt_out"
    out.mkdir()
    torch.save({"model": Exploit(), "model_args": {}}, out / payload_file)
    for argv in (["sample", f"--out_dir={out}", "--max_new_tokens=5", "--num_samples=1"],
                 ["train", f"--out_dir={out}", "--init_from=resume", "--device=cpu"]):
        assert main(argv) == 2
        assert "folio: error:" in capsys.readouterr().err
    assert not marker.exists()
