"""`folio train` end to end: configs, checkpoints, exact resume, Ctrl+C."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_args

from folio.cli import main
from folio.config import TrainConfig
from folio.store.rundir import read_run_info
from folio.store.sources import load_model
from folio.train.loop import train
from folio.watch.metrics import read_metrics


def train_losses(run_dir: Path) -> dict[int, float]:
    return {row["iter"]: row["loss"] for row in read_metrics(run_dir).train}


@pytest.mark.slow
def test_nanogpt_py_config_and_overrides_drive_a_real_run(char_data_dir, tmp_path, capsys):
    config = tmp_path / "train_tiny.py"
    config.write_text("# a nanoGPT-style config\nn_layer = 3\nn_embd = 48\nmax_iters = 10\n"
                      "eval_interval = 5\nlearning_rate = 2e-3 # comment\n")
    out = tmp_path / "run"
    args = [a for a in tiny_args(char_data_dir, out)
            if not a.startswith(("--n_layer", "--learning_rate"))]
    assert main(["train", str(config), *args, "--n_embd", "32"]) == 0
    info = read_run_info(out)
    assert info.config["n_layer"] == 3  # from the file
    assert info.model["n_embd"] == 32  # the command line wins over the file
    assert info.config["learning_rate"] == 2e-3
    assert info.iter_num == 10
    assert {"model.safetensors", "resume.safetensors", "metrics.jsonl"} <= set(info.files)
    first = capsys.readouterr().out.splitlines()
    assert any("training on cpu" in line and "10 " in line.replace("->", " ") for line in first)
    model, tokenizer, _ = load_model(out)
    assert tokenizer.vocab_size == 65 and model.config.n_layer == 3


@pytest.mark.slow
def test_train_from_python_trains_exactly_its_config(char_data_dir, tmp_path, capsys):
    cfg = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=4,
                      eval_interval=4, eval_iters=2, warmup_iters=2, device="cpu",
                      compile=False, dtype="float32", data_dir=str(char_data_dir),
                      dataset="shakespeare_char", out_dir=str(tmp_path / "run"))
    assert train(cfg) == 0
    # tie_head=auto is recorded as the model was built: the nanoGPT recipe's tied head
    assert read_run_info(tmp_path / "run").config == {**dataclasses.asdict(cfg), "tie_head": True}
    assert capsys.readouterr().out.startswith("folio: model has 0.")  # no device default note


def test_eval_losses_fall_and_are_logged(tiny_run):
    evals = read_metrics(tiny_run).eval
    assert [row["iter"] for row in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["best_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert info["tokenizer"]["kind"] == "char" and info["versions"]["torch"]


def straight_and_resumed(data_dir: Path, tmp_path: Path, **settings) -> tuple[Path, Path]:
    """A 16-iteration run straight, and one stopped at 8 and resumed to 16 (same settings)."""
    common = dict(max_iters=16, lr_decay_iters=16, eval_interval=8, log_interval=1, **settings)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_args(data_dir, straight, **common)]) == 0
    assert main(["train", *tiny_args(data_dir, resumed, **{**common, "max_iters": 8})]) == 0
    assert main(["train", *tiny_args(data_dir, resumed, **common), "--init_from=resume"]) == 0
    expected, got = train_losses(straight), train_losses(resumed)
    assert list(got) == list(range(1, 17))
    assert got == expected  # exact float equality
    return straight, resumed


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(char_data_dir, tmp_path):
    """N iterations + resume to 2N gives bitwise the same losses as 2N straight (CPU, fp32)."""
    _, resumed = straight_and_resumed(char_data_dir, tmp_path, dropout=0.1)
    assert [r["iter"] for r in read_metrics(resumed).eval] == [0, 8, 16]


@pytest.mark.slow
def test_resume_takes_the_model_shape_from_the_checkpoint(tiny_run, char_data_dir, tmp_path):
    """As in nanoGPT, `--init_from=resume` needs no shape settings; a given one must match."""
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    assert main(["train", "--init_from=resume", f"--out_dir={run}", f"--data_dir={char_data_dir}",
                 "--dataset=shakespeare_char", "--device=cpu", "--compile=False",
                 "--dtype=float32", "--max_iters=45", "--eval_iters=2", "--eval_interval=45"]) == 0
    info = read_run_info(run)
    assert info.iter_num == 45
    assert (info.config["n_layer"], info.config["n_embd"]) == (2, 32)  # tiny_run's, not 4/128
    code = main(["train", *tiny_args(char_data_dir, run, max_iters=50), "--n_layer=3",
                 "--init_from=resume"])
    assert code == 2


def test_eval_only_evaluates_and_exits(tiny_run, char_data_dir, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    before = (run / "model.safetensors").read_bytes()
    assert main(["train", *tiny_args(char_data_dir, run, max_iters=40, eval_interval=20,
                                     lr_decay_iters=40), "--init_from=resume",
                 "--eval_only=True"]) == 0
    assert (run / "model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_bpe_run_loss_falls_from_about_10_8(seeded_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FOLIO_CACHE", str(seeded_cache))
    data = tmp_path / "data"
    assert main(["prepare", "shakespeare", f"--data_dir={data}"]) == 0
    out = tmp_path / "bpe"
    assert main(["train", *tiny_args(data, out, max_iters=30, eval_interval=30,
                                     lr_decay_iters=30, learning_rate=3e-3),
                 "--dataset=shakespeare", "--batch_size=4"]) == 0
    evals = read_metrics(out).eval
    assert evals[0]["val_loss"] == pytest.approx(10.83, abs=0.15)  # ln(50304): uniform
    assert evals[-1]["val_loss"] < 9.8


def start_training(char_data_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = tiny_args(char_data_dir, out, max_iters=100_000, eval_interval=50, log_interval=1,
                     lr_decay_iters=100_000)
    return subprocess.Popen([sys.executable, "-m", "folio", "train", *args, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_iterations(out: Path, count: int, proc: subprocess.Popen, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    pytest.fail("training did not reach the expected iteration in time")


@pytest.mark.slow
def test_sigint_saves_a_resumable_checkpoint(char_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start_training(char_data_dir, out)
    wait_for_iterations(out, 5, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "--init_from=resume" in stderr
    info = read_run_info(out)
    assert info.iter_num >= 5
    resumed = start_training(char_data_dir, out, "--init_from=resume")
    wait_for_iterations(out, info.iter_num + 3, resumed)
    resumed.send_signal(signal.SIGTERM)
    _, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 130, stderr
    rows = read_metrics(out).train
    iters = [row["iter"] for row in rows]
    assert iters == list(range(1, len(iters) + 1))  # continued, no gap, no repeat
