"""`folio eval RUN`: loss and bits per byte on a fixed number of tokens of any text, with
confidence intervals, recorded in the run dir; bad input is one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from folio.cli import main
from folio.data.tokenizer import read_meta
from folio.store.rundir import read_evals
from folio.store.sources import load_model
from folio.train.eval_run import score_tokens

ASCII = ("ROMEO: But soft, what light through yonder window breaks?\n"
         "It is the east, and Juliet is the sun.\n") * 6


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A writable copy of the trained tiny char run (block_size 32)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "tiny"))


def test_eval_scores_exactly_the_tokens_asked_for_in_windows(run, tmp_path, capsys):
    text = tmp_path / "romeo.txt"
    text.write_text(ASCII)
    assert main(["eval", str(run), f"--data={text}", "--tokens=100", "--device=cpu"]) == 0
    out = capsys.readouterr().out
    row = read_evals(run)[-1]
    assert (row["tokens"], row["windows"], row["window"], row["bytes"]) == (100, 4, 32, 100)
    # the same numbers from the model's own loss, window by window (32, 32, 32, then 4)
    model, tok, _ = load_model(run)
    ids = torch.tensor(tok.encode(ASCII))
    nats = 0.0
    with torch.no_grad():
        for start in range(0, 100, 32):
            n = min(32, 100 - start)
            nats += model(ids[None, start:start + n], ids[None, start + 1:start + n + 1]
                          ).item() * n
    assert row["loss"] == pytest.approx(nats / 100, rel=1e-5)
    assert row["bpb"] == pytest.approx(nats / 100 / math.log(2), rel=1e-5)  # ASCII: 1 byte
    assert row["loss_ci"] > 0 and row["bpb_ci"] == pytest.approx(row["loss_ci"] / math.log(2),
                                                                 rel=1e-6)
    assert out.startswith(f"eval {run} on {text.resolve()}: 100 tokens (100 bytes) in 4 "
                          "window(s) of 32 | loss ")
    assert "± " in out and out.rstrip().endswith("(95% intervals)")


def test_a_uniform_model_has_the_bits_per_byte_computed_by_hand():
    # "aé日🎭" repeated: 32 targets hold each character 8 times, 80 bytes; uniform over the
    # 4 tokens is 2 bits per token: 64 / 80 = 0.8 bits per byte, the same in every window
    from folio.model.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=4, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    tokens = np.tile(np.arange(4), 100)
    score = score_tokens(model, tokens, np.array([1, 2, 3, 4]), 128, torch.device("cpu"))
    assert (score.tokens, score.windows, score.bytes) == (128, 4, 320)
    assert score.loss == pytest.approx(math.log(4)) and score.bpb == pytest.approx(0.8)
    assert score.loss_ci == pytest.approx(0, abs=1e-9)  # every window alike


def test_eval_defaults_to_the_runs_dataset_and_one_window_has_no_interval(run, capsys):
    assert main(["eval", str(run), "--tokens=20", "--device=cpu"]) == 0
    row = read_evals(run)[-1]
    dataset = Path(json.loads((run / "run.json").read_text())["config"]["data_dir"]) / \
        "shakespeare_char"
    assert row["data"] == f"{dataset} (val)" and row["windows"] == 1
    assert row["loss_ci"] is None and "±" not in capsys.readouterr().out
    assert main(["eval", str(run), "--tokens=40", "--split=train", "--device=cpu"]) == 0
    assert len(read_evals(run)) == 2 and read_evals(run)[-1]["data"].endswith("(train)")


@pytest.mark.parametrize("case, message", [
    ("unknown_chars", "character(s) not in this model's vocabulary"),
    ("too_short", "has 1 token(s): too short to score"),
    ("other_tokenizer", "was prepared with another tokenizer"),
    ("no_weights", "model.safetensors"),
    ("missing_text", "does not exist"),
])
def test_bad_eval_input_is_one_line(case, message, run, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text({"unknown_chars": "日本語", "too_short": "A"}.get(case, ASCII))
    if case == "other_tokenizer":
        assert main(["prepare", str(data), "--tokenizer=gpt2", f"--data_dir={tmp_path}"]) == 0
        data = tmp_path / "text"
        assert read_meta(data)["tokenizer"] == {"kind": "gpt2"}
    if case == "no_weights":
        (run / "model.safetensors").unlink()
        (run / "resume.safetensors").unlink()
    if case == "missing_text":
        data = tmp_path / "nope.txt"
    capsys.readouterr()
    assert main(["eval", str(run), f"--data={data}", "--device=cpu"]) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert read_evals(run) == []
