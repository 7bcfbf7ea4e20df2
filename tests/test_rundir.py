"""The run dir has one owner: one run.json schema, and runs that are never lost silently."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from folio.cli import main
from folio.store import checkpoint, guard, rundir
from folio.store.rundir import MODEL_FILE, RUN_INFO, RunInfo, read_run_info
from folio.store.sources import load_model
from folio.watch.metrics import read_metrics

# run.json exactly as folio wrote it before RunInfo (format 1): training's keys ...
FORMAT_1_TRAIN_KEYS = ("config", "model", "tokenizer", "dataset", "iter_num", "best_val_loss",
                       "best_iter", "dtype", "compile", "world_size", "versions", "git",
                       "device")


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".lock"))
    return to


def contents(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.name != rundir.LOCK_FILE}


def write_format_1(run: Path, **extra) -> None:
    """Rewrite run.json with the keys and layout the old Trainer.write_info used."""
    info = read_run_info(run).to_json()
    old = {"format_version": 1, **{k: info[k] for k in FORMAT_1_TRAIN_KEYS}, **extra,
           "files": info["files"]}
    (run / RUN_INFO).write_text(json.dumps(old, indent=2) + "\n", encoding="utf-8")


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process that claims run's lock and keeps it until killed."""
    code = ("import sys, time\nfrom folio.store.guard import claim\n"
            f"with claim({str(run)!r}, fresh=False) as lock:\n"
            "    lock.record_holder()\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_run_info_round_trips_through_run_json(tmp_path):
    info = RunInfo(model={"n_layer": 2}, n_params=1234, tokenizer={"kind": "gpt2"},
                   config={"seed": 1}, dataset="x", iter_num=7, best_val_loss=1.5, best_iter=5,
                   dtype="float32", compile=False, device="cpu",
                   versions={"torch": torch.__version__})
    rundir.write_run_info(tmp_path, info)
    read = read_run_info(tmp_path)
    assert read.files == [RUN_INFO] and read.format_version == rundir.RUN_FORMAT_VERSION
    assert read == RunInfo(**{**info.__dict__, "files": [RUN_INFO]})


def test_run_json_records_the_trained_models_parameter_count(tiny_run):
    model, _, _ = load_model(tiny_run)
    assert read_run_info(tiny_run).n_params == model.num_params() > 0


def test_run_json_newer_than_this_folio_is_a_one_line_error(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    data = json.loads((run / RUN_INFO).read_text())
    (run / RUN_INFO).write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(rundir.CheckpointError, match="upgrade folio"):
        read_run_info(run)


def test_format_1_run_json_still_loads_samples_and_resumes(tiny_run, char_data_dir, tmp_path,
                                                            capsys):
    run = copy_run(tiny_run, tmp_path / "old")
    write_format_1(run)
    info = read_run_info(run)
    assert info.source == "train" and info.iter_num == 40 and info.imported_from is None
    model, _, _ = load_model(run)
    reference, _, _ = load_model(tiny_run)
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(model(x)[0], reference(x)[0])
    assert main(["sample", str(run), "--max_new_tokens=5", "--num_samples=1",
                 "--device=cpu"]) == 0
    assert capsys.readouterr().out
    assert main(["train", *tiny_args(char_data_dir, run, max_iters=45, eval_interval=20,
                                     lr_decay_iters=40), "--init_from=resume"]) == 0
    assert read_run_info(run).iter_num == 45 and read_run_info(run).format_version == 2


def test_format_1_run_json_of_an_import_reads_as_an_import(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "imported")
    write_format_1(run, imported_from={"nanogpt": "out/ckpt.pt", "meta": None})
    info = read_run_info(run)
    assert info.source == "nanogpt" and info.imported_from["nanogpt"] == "out/ckpt.pt"


def test_fresh_train_into_a_saved_run_refuses_and_touches_nothing(tiny_run, char_data_dir,
                                                                  tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    before = contents(run)
    best = read_run_info(run).best_val_loss
    assert main(["train", *tiny_args(char_data_dir, run, max_iters=5)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("folio: error:")
    assert f"iter 40 (best val loss {best:.4f})" in err
    assert "--init_from=resume" in err and "--out_dir" in err and "--overwrite=True" in err
    assert contents(run) == before  # only the (released) lock file was created


def test_overwrite_switch_replaces_the_saved_run(tiny_run, char_data_dir, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    assert main(["train", *tiny_args(char_data_dir, run, max_iters=5), "--overwrite=True"]) == 0
    assert read_run_info(run).iter_num == 5
    assert [r["iter"] for r in read_metrics(run).train] == [5]  # the old curve is gone
    assert not (run / MODEL_FILE).exists()  # no eval since: the old best weights went too
    assert checkpoint.load_resume(run).iter_num == 5


def test_a_failed_setup_leaves_no_out_dir_behind(char_data_dir, tmp_path):
    out = tmp_path / "new"
    assert main(["train", *tiny_args(char_data_dir, out), "--dataset=missing"]) == 2
    assert not out.exists()


@pytest.mark.slow
def test_a_live_lock_holder_blocks_training_and_is_named(tiny_run, char_data_dir, tmp_path,
                                                         capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    holder = hold_lock(run)
    try:
        for extra in (["--init_from=resume"], ["--overwrite=True"]):
            assert main(["train", *tiny_args(char_data_dir, run, max_iters=45), *extra]) == 2
            err = capsys.readouterr().err
            assert f"is being trained by pid {holder.pid} on " in err
            assert len(err.strip().splitlines()) == 1
        assert read_run_info(run).iter_num == 40
        # readers never take the lock
        assert main(["sample", str(run), "--max_new_tokens=5", "--num_samples=1",
                     "--device=cpu"]) == 0
        assert main(["plot", str(run), "-o", str(tmp_path / "loss.png")]) == 0
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_never_blocks(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    holder = hold_lock(run)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in (run / rundir.LOCK_FILE).read_text()  # the file stays behind
    with guard.claim(run, fresh=False) as lock:
        lock.record_holder()
        assert str(os.getpid()) in (run / rundir.LOCK_FILE).read_text()


@pytest.mark.slow
def test_a_second_train_on_a_running_run_is_refused_and_a_killed_one_resumes(
        char_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(char_data_dir, out, max_iters=100_000, eval_interval=5, eval_iters=1,
                     log_interval=1, lr_decay_iters=100_000)
    proc = subprocess.Popen([sys.executable, "-m", "folio", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while not (out / MODEL_FILE).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert main(["train", *args, "--init_from=resume"]) == 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
        assert main(["sample", str(out), "--max_new_tokens=5", "--num_samples=1",
                     "--device=cpu"]) == 0  # while it trains
    finally:
        proc.kill()
        proc.communicate()
    saved = checkpoint.load_resume(out).iter_num
    assert main(["train", *tiny_args(char_data_dir, out, max_iters=saved + 2, eval_interval=5,
                                     eval_iters=1), "--init_from=resume"]) == 0
    assert read_run_info(out).iter_num == saved + 2


def test_docs_describe_every_run_json_key():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "run-format.md").read_text("utf-8")
    missing = [f.name for f in dataclasses.fields(RunInfo) if f"| `{f.name}` |" not in doc]
    assert missing == []
