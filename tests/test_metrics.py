"""metrics.jsonl writer and reader, console line formats, and the pasted-log parser."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import struct
import sys
import termios
from pathlib import Path

import pytest

from folio.errors import DataError
from folio.watch.metrics import (
    EVAL_KEYS,
    TRAIN_KEYS,
    MetricsLog,
    format_duration,
    format_eval_line,
    format_train_line,
    parse_log,
    read_metrics,
)

# A nanoGPT run as its console showed it (train_shakespeare_char.py), noise lines included.
NANOGPT_LOG = """\
Overriding config with config/train_shakespeare_char.py:
# train a miniature character-level shakespeare model
# good for debugging and playing on macbooks and such

out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
tokens per iteration will be: 16,384
found vocab_size = 65 (inside data/shakespeare_char/meta.pkl)
Initializing a new model from scratch
number of parameters: 10.65M
num decayed parameter tensors: 26, with 10,740,096 parameters
num non-decayed parameter tensors: 13, with 4,992 parameters
using fused AdamW: True
compiling the model... (takes a ~minute)
step 0: train loss 4.2874, val loss 4.2823
iter 0: loss 4.2654, time 29563.15ms, mfu -100.00%
iter 10: loss 3.2457, time 51.55ms, mfu 7.24%
iter 20: loss 2.7914, time 51.61ms, mfu 7.23%
iter 240: loss 2.0539, time 51.84ms, mfu 7.20%
step 250: train loss 1.9543, val loss 2.0516
saving checkpoint to out-shakespeare-char
iter 250: loss 1.9985, time 5612.30ms, mfu 6.56%
iter 260: loss 1.9682, time 51.40ms, mfu 6.63%
"""


def log_rows(log: MetricsLog, iters=range(0, 50, 10), eval_every: int = 20) -> None:
    """A small synthetic run: train rows every 10 iters and evals every `eval_every`."""
    for it in iters:
        if it % eval_every == 0:
            log.log_eval(it, it * 256, it * 0.05, 4.0 - it / 100, 4.1 - it / 100)
        log.log_train(it, it * 256, it * 0.05 + 0.01, 4.2 - it / 90, 1e-3 * (1 - it / 100),
                      12.5, 20480.0, 0.015)


def file_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_log_call_appends_one_json_line_with_the_design_keys(tmp_path):
    with MetricsLog(tmp_path, console=False, plot_every_eval=False) as log:
        log.log_eval(0, 0, 0.0, 4.25, 4.26)
        log.log_train(10, 2560, 0.5, 3.9, 6e-4, 50.0, 51200.0, None)
        # flushed per line: readable while the log is still open
        assert len(file_rows(tmp_path)) == 2
    eval_row, train_row = file_rows(tmp_path)
    assert list(eval_row) == ["kind", *EVAL_KEYS] and eval_row["kind"] == "eval"
    assert list(train_row) == ["kind", *TRAIN_KEYS] and train_row["kind"] == "train"
    assert train_row == {"kind": "train", "iter": 10, "tokens": 2560, "time_s": 0.5,
                         "loss": 3.9, "lr": 6e-4, "ms_per_iter": 50.0,
                         "tokens_per_sec": 51200.0, "mfu": None}


def test_read_metrics_returns_the_rows_written(tmp_path):
    with MetricsLog(tmp_path, console=False, plot_every_eval=False) as log:
        log_rows(log)
    m = read_metrics(tmp_path)
    rows = file_rows(tmp_path)
    assert m.train == [r for r in rows if r["kind"] == "train"]
    assert m.eval == [r for r in rows if r["kind"] == "eval"]
    assert [r["iter"] for r in m.eval] == [0, 20, 40]
    assert m.name == tmp_path.name
    assert read_metrics(tmp_path / "metrics.jsonl").train == m.train


def test_torn_last_line_is_skipped_and_the_next_row_starts_a_new_line(tmp_path):
    with MetricsLog(tmp_path, console=False, plot_every_eval=False) as log:
        log_rows(log)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "iter": 50, "tok')  # a crash mid-write
    assert [r["iter"] for r in read_metrics(tmp_path).train] == [0, 10, 20, 30, 40]
    with MetricsLog(tmp_path, console=False, plot_every_eval=False) as log:
        log.log_train(50, 12800, 2.5, 3.5, 1e-4, 12.0, 21000.0, 0.01)
    assert [r["iter"] for r in read_metrics(tmp_path).train] == [0, 10, 20, 30, 40, 50]


def test_truncate_after_drops_rows_past_the_resumed_iteration(tmp_path):
    with MetricsLog(tmp_path, console=False, plot_every_eval=False) as log:
        log_rows(log)
    before = file_rows(tmp_path)
    with MetricsLog(tmp_path, console=False, plot_every_eval=False) as log:
        log.truncate_after(20)
        log.log_train(30, 7680, 1.6, 3.0, 5e-4, 12.5, 20480.0, 0.015)
    after = file_rows(tmp_path)
    assert after[:-1] == [r for r in before if r["iter"] <= 20]  # same rows, same order
    assert after[-1]["iter"] == 30 and after[-1]["loss"] == 3.0


def test_a_fresh_run_can_clear_an_old_metrics_file(tmp_path):
    with MetricsLog(tmp_path, console=False, plot_every_eval=False) as log:
        log_rows(log)
    with MetricsLog(tmp_path, console=False, plot_every_eval=False) as log:
        log.truncate_after(-1)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_non_finite_values_are_stored_as_null(tmp_path):
    with MetricsLog(tmp_path, console=False, plot_every_eval=False) as log:
        log.log_train(10, 2560, 0.5, float("nan"), 1e-3, 10.0, 1000.0, float("inf"))
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["loss"] is None


@pytest.mark.slow
def test_loss_png_is_refreshed_after_evals_without_temp_files(tmp_path):
    with MetricsLog(tmp_path, console=False) as log:
        log_rows(log)
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


@pytest.mark.slow
def test_a_failing_loss_png_refresh_warns_once_and_training_goes_on(tmp_path, capfd):
    (tmp_path / "loss.png").mkdir()  # nothing can replace a directory with a file
    with MetricsLog(tmp_path, console=False) as log:
        log_rows(log, iters=range(0, 100, 10))
    err = capfd.readouterr().err
    assert err.count("could not refresh") == 1 and "Traceback" not in err
    assert len(read_metrics(tmp_path).eval) == 5


def test_console_lines_parse_back_to_the_logged_values(tmp_path, capsys):
    with MetricsLog(tmp_path, console=True, plot_every_eval=False, max_iters=40) as log:
        log_rows(log)
    out = capsys.readouterr().out
    assert "iter 10/40 | loss 4.0889 | lr 9.00e-04 | 12.5 ms/iter | 20,480 tok/s | mfu 1.50%" \
        in out
    parsed, written = parse_log(out), read_metrics(tmp_path)
    assert [r["iter"] for r in parsed.train] == [r["iter"] for r in written.train]
    for p, w in zip(parsed.train, written.train, strict=True):
        assert p["loss"] == pytest.approx(w["loss"], abs=5e-5)
        assert p["lr"] == pytest.approx(w["lr"], rel=1e-2)
        assert p["ms_per_iter"] == w["ms_per_iter"] and p["tokens_per_sec"] == 20480
        assert p["mfu"] == pytest.approx(w["mfu"])
    assert [(r["iter"], r["val_loss"]) for r in parsed.eval] == \
        [(r["iter"], round(r["val_loss"], 4)) for r in written.eval]


TTY_RUN = """
import sys, time
from pathlib import Path
from folio.watch.metrics import MetricsLog
with MetricsLog(Path(sys.argv[1]), plot_every_eval=False, max_iters=1040) as log:
    for it in range(1000, 1041, 20):  # a resumed run: the bar starts at 1000
        log.log_train(it, 0, 0.0, 3.0, 1e-3, 10.0, 1000.0, None)
        time.sleep(0.15)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a POSIX pseudo-terminal")
def test_on_a_terminal_a_progress_bar_runs_under_the_log_lines(tmp_path):
    pid, fd = pty.fork()
    if pid == 0:  # the child: a 100-column terminal, then the run
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        os.execv(sys.executable, [sys.executable, "-c", TTY_RUN, str(tmp_path)])
    out = b""
    with contextlib.suppress(OSError):  # EIO once the child has exited
        while chunk := os.read(fd, 4096):
            out += chunk
    os.waitpid(pid, 0)
    text = out.decode()
    assert "iter 1040/1040 | loss 3.0000" in text
    assert re.search(r"9\d%\|█+.*\| 10[0-4]0/1040", text)  # the bar, at the resumed iteration


def test_format_train_line_matches_the_documented_example():
    line = format_train_line(120, 2000, 2.10341, 9.8e-4, 33.12, 23201.4, 0.0123, 62)
    assert line == ("iter 120/2000 | loss 2.1034 | lr 9.80e-04 | 33.1 ms/iter | "
                    "23,201 tok/s | mfu 1.23% | eta 1m02s")
    assert format_train_line(5, None, 4.0, 1e-3, 10, 100, None) == \
        "iter 5 | loss 4.0000 | lr 1.00e-03 | 10.0 ms/iter | 100 tok/s"
    assert format_eval_line(250, 1.95431, 2.05163) == \
        "eval 250: train loss 1.9543, val loss 2.0516"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (62, "1m02s"),
                                           (3599, "59m59s"), (3600 * 3 + 300, "3h05m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_parse_nanogpt_log_keeps_train_and_eval_lines_and_skips_the_rest():
    m = parse_log(NANOGPT_LOG)
    assert [(r["iter"], r["loss"]) for r in m.train] == [
        (0, 4.2654), (10, 3.2457), (20, 2.7914), (240, 2.0539), (250, 1.9985), (260, 1.9682)]
    assert [(r["iter"], r["train_loss"], r["val_loss"]) for r in m.eval] == [
        (0, 4.2874, 4.2823), (250, 1.9543, 2.0516)]
    assert m.train[0]["mfu"] is None  # nanoGPT prints -100% before it has a measurement
    assert m.train[1]["mfu"] == pytest.approx(0.0724)
    assert m.train[1]["ms_per_iter"] == 51.55
    # elapsed time: each line's own iteration, plus the ones before it at the smaller ms
    # (iter 0 compiled; iter 250 evaluated and saved a checkpoint: both counted once)
    t = [r["time_s"] for r in m.train]
    assert t[0] == pytest.approx(29.56315)
    assert t[1] - t[0] == pytest.approx(0.05155 * 10)
    assert t[4] - t[3] == pytest.approx(5.6123 + 0.05184 * 9)
    assert m.eval[1]["time_s"] == pytest.approx(t[3] + 0.05184 * 10)  # before iter 250's step
    assert m.eval[0]["time_s"] == 0.0
    assert all(r["tokens"] is None for r in m.train)  # a nanoGPT log does not say


def test_parse_folio_log_with_progress_bar_noise():
    text = ("folio: training on cpu (float32, compile off, 1 process)\n"
            "eval 0: train loss 4.2874, val loss 4.2823\n"
            "  3%|▎         | 10/300 [00:01<00:29]\r"
            "iter 10/300 | loss 3.2457 | lr 1.00e-03 | 50.0 ms/iter | 1,024,000 tok/s | eta 14s\n"
            "iter 20/300 | loss 2.7914 | lr 1.00e-03 | 40.0 ms/iter | 1,280,000 tok/s | mfu 3.10%"
            " | eta 11s\n")
    m = parse_log(text)
    assert [(r["iter"], r["loss"], r["mfu"]) for r in m.train] == [
        (10, 3.2457, None), (20, 2.7914, pytest.approx(0.031))]
    assert m.train[0]["tokens_per_sec"] == 1_024_000
    assert [r["tokens"] for r in m.train] == [10 * 51_200, 20 * 51_200]
    assert m.eval[0]["tokens"] == 0 and m.eval[0]["time_s"] == 0.0


def test_a_restarted_log_keeps_the_last_line_for_each_iteration():
    m = parse_log("iter 10: loss 3.0, time 5ms, mfu 1.00%\niter 20: loss 2.0, time 5ms\n"
                  "iter 10: loss 2.9, time 5ms, mfu 1.00%\n")
    assert [(r["iter"], r["loss"]) for r in m.train] == [(10, 2.9), (20, 2.0)]


@pytest.mark.parametrize("text", ["", "hello\nnumber of parameters: 10.65M\n"])
def test_a_log_without_training_lines_names_the_expected_formats(text):
    with pytest.raises(DataError) as e:
        parse_log(text, name="train.log")
    msg = str(e.value)
    assert "train.log" in msg and "\n" not in msg
    assert "iter 3347: loss 3.4083, time 147.35ms" in msg and "step 250: train loss" in msg
    assert "eval 250: train loss" in msg


def test_a_run_dir_without_metrics_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="has no metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="no metric rows"):
        read_metrics(tmp_path)
