"""wandb (offline) and TensorBoard receive the same metrics as metrics.jsonl."""

from __future__ import annotations

import json
import re
import struct
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_args
from test_metrics import log_rows

from folio.cli import main as folio_main
from folio.errors import MissingPackageError
from folio.watch.metrics import MetricsLog, read_metrics

WANDB_CFG = {"project": "folio-test", "name": "tiny", "config": {"n_layer": 2}}


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb in offline mode with every directory it writes under tmp_path."""
    home = tmp_path / "wandb-home"
    for var, sub in [("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")]:
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def read_wandb_history(run_dir: Path, timeout: float = 30.0) -> list[dict]:
    """The history rows of the offline run under run_dir.

    wandb's writer is a separate process (wandb-core) that may still be writing when
    `finish()` returns, so wait (bounded) until the log holds the run's exit record."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(files[0])
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{files[0]} has no exit record after {timeout} s"
        time.sleep(0.1)
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a LevelDB-style log (7-byte file header, 32 KiB
    blocks of crc/length/type-framed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, chunks, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a header: the block is padded
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk ends a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


@pytest.mark.slow
def test_wandb_offline_leaves_a_local_run_with_the_metrics(tmp_path, wandb_offline):
    run = tmp_path / "run"
    run.mkdir()
    with MetricsLog(run, console=False, plot_every_eval=False, wandb_cfg=WANDB_CFG) as log:
        log_rows(log)
    history = {h["_step"]: h for h in read_wandb_history(run)}
    m = read_metrics(run)
    assert sorted(history) == [r["iter"] for r in m.train]
    for r in m.train:
        h = history[r["iter"]]
        assert h["train/loss"] == pytest.approx(r["loss"])
        assert h["train/lr"] == pytest.approx(r["lr"])
        assert h["tokens"] == r["tokens"]
    for e in m.eval:
        assert history[e["iter"]]["eval/val_loss"] == pytest.approx(e["val_loss"])
        assert history[e["iter"]]["eval/train_loss"] == pytest.approx(e["train_loss"])


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_read_back_with_the_logged_values(tmp_path):
    with MetricsLog(tmp_path, console=False, plot_every_eval=False, tensorboard=True) as log:
        log_rows(log)
    scalars, m = tensorboard_scalars(tmp_path), read_metrics(tmp_path)
    assert {"train/loss", "train/lr", "train/ms_per_iter", "train/tokens_per_sec", "train/mfu",
            "eval/train_loss", "eval/val_loss"} <= set(scalars)
    assert scalars["train/loss"] == [(r["iter"], pytest.approx(r["loss"])) for r in m.train]
    assert scalars["eval/val_loss"] == [(r["iter"], pytest.approx(r["val_loss"]))
                                        for r in m.eval]


@pytest.mark.parametrize("module, kwargs, extra", [
    ("wandb", {"wandb_cfg": WANDB_CFG}, "folio[wandb]"),
    ("torch.utils.tensorboard", {"tensorboard": True}, "folio[tensorboard]")])
def test_a_missing_integration_package_is_a_one_line_error(tmp_path, monkeypatch, module,
                                                           kwargs, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when it is not installed
    with pytest.raises(MissingPackageError, match=rf"pip install '{re.escape(extra)}'"):
        MetricsLog(tmp_path, console=False, plot_every_eval=False, **kwargs)


@pytest.mark.slow
def test_training_with_wandb_and_tensorboard_logs_what_metrics_jsonl_has(
        char_data_dir, tmp_path, wandb_offline):
    out = tmp_path / "run"
    assert folio_main(["train", *tiny_args(char_data_dir, out, max_iters=10, eval_interval=5,
                                           lr_decay_iters=10),
                       "--wandb_log=True", "--tensorboard=True"]) == 0
    m = read_metrics(out)
    scalars = tensorboard_scalars(out)
    assert scalars["train/loss"] == [(r["iter"], pytest.approx(r["loss"])) for r in m.train]
    assert scalars["eval/val_loss"] == [(r["iter"], pytest.approx(r["val_loss"]))
                                        for r in m.eval]
    history = {h["_step"]: h for h in read_wandb_history(out)}
    assert [history[r["iter"]]["train/loss"] for r in m.train] == \
        [pytest.approx(r["loss"]) for r in m.train]
    assert (out / "loss.png").is_file()


@pytest.mark.slow
def test_resuming_a_run_continues_its_wandb_run(char_data_dir, tmp_path, wandb_offline):
    out = tmp_path / "run"
    args = ["train", *tiny_args(char_data_dir, out, eval_interval=5, lr_decay_iters=10),
            "--wandb_log=True"]
    assert folio_main([*args, "--max_iters=5"]) == 0
    assert folio_main([*args, "--max_iters=10", "--init_from=resume"]) == 0
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    # offline-run-DATE_TIME-ID, and wandb appends "-1" when both start in the same second
    ids = {run.name.split("-")[3] for run in runs}
    assert len(ids) == 1, runs  # both processes logged to one wandb run
