"""Bits per byte: each token's byte length, the summed loss over the targets' bytes, and where
it is carried (metrics.jsonl, the console line, run.json, `folio plot --metric=bpb`)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil

import numpy as np
import pytest
import torch

from folio.cli import main as folio_main
from folio.data.loader import Loader
from folio.data.tokenizer import CharTokenizer, GPT2Tokenizer, HFTokenizer, read_meta
from folio.model.gpt import GPT, GPTConfig
from folio.speed import kernels
from folio.store.rundir import read_run_info
from folio.train.evaluate import EVAL_SEED, Score, estimate_loss, token_byte_lengths
from folio.watch.chart import make_chart
from folio.watch.metrics import format_eval_line, parse_log, read_metrics
from folio.watch.plot import make_figure

MULTI_BYTE = "aé日🎭"  # 1, 2, 3 and 4 UTF-8 bytes
CPU = torch.device("cpu")


def tiny_gpt(vocab_size: int, block_size: int = 32) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=1, n_head=2,
                         n_embd=16, bias=False))


def evaluate(model: GPT, tokens: np.ndarray, lengths: np.ndarray | None, **kw) -> Score:
    kw = {"eval_iters": 4, "batch_size": 3, "block_size": 32, **kw}
    return estimate_loss(model, {"val": tokens}, device=CPU, autocast=contextlib.nullcontext,
                         token_bytes=None if lengths is None else torch.from_numpy(lengths),
                         **kw)["val"]


# ------------------------------------------------------------------ token byte lengths

def test_char_token_bytes_are_the_utf8_length_of_each_character():
    tok = CharTokenizer(list(MULTI_BYTE))
    assert tok.token_bytes().tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("text", ["hello world", "héllo wörld — 日本語 🎭\nnaïve café 👩‍🔬"])
def test_gpt2_token_bytes_sum_to_the_text_bytes_and_end_of_text_counts_zero(text):
    tok = GPT2Tokenizer()
    lengths = tok.token_bytes()
    assert lengths.shape == (tok.vocab_size,)
    assert lengths[tok.eot_id] == 0
    ids = tok.encode(text) + [tok.eot_id]
    assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_hf_byte_level_token_bytes_are_exact_and_special_tokens_count_zero(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "héllo wörld — 日本語 🎭 " * 50
    tok.train_from_iterator([text], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(str(tmp_path))
    lengths = hf.token_bytes()
    assert lengths[hf.eot_id] == 0 and lengths.shape == (hf.vocab_size,)
    sample = "wörld 日本 🎭 héllo"
    assert lengths[hf.encode(sample)].sum() == len(sample.encode("utf-8"))


# ------------------------------------------------------------------ the evaluation

@pytest.mark.parametrize("fused", [False, True], ids=["plain_loss", "fused_loss"])
def test_a_uniform_model_has_the_bits_per_byte_computed_by_hand(fused):
    # A text repeating "aé日🎭": every 32-token window holds each character 8 times, so its
    # targets are 8 * (1 + 2 + 3 + 4) = 80 bytes; a model that predicts uniformly over the 4
    # tokens pays ln 4 nats per token: 32 * 2 bits / 80 bytes = 0.8 bits per byte.
    tok = CharTokenizer(list(MULTI_BYTE))
    tokens = tok.encode_array(MULTI_BYTE * 200, np.uint16)
    model = tiny_gpt(tok.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: uniform
    kernels.apply(model, kernels.Kernels(fused_loss=fused))
    score = evaluate(model, tokens, tok.token_bytes())
    assert score.tokens == 4 * 3 * 32
    assert score.bytes == score.tokens // 32 * 80
    assert score.loss == pytest.approx(math.log(4), rel=1e-6)
    assert score.bpb == pytest.approx(0.8, rel=1e-6)


def test_bytes_are_those_of_the_decoded_targets():
    # random windows of a text of mixed widths: the bytes counted are the decoded targets'
    text = "héllo wörld — 日本語 🎭 naïve café, Ωμέγα; " * 40
    tok = CharTokenizer.from_text(text)
    tokens = tok.encode_array(text, np.uint16)
    score = evaluate(tiny_gpt(tok.vocab_size), tokens, tok.token_bytes())
    loader = Loader(tokens, 3, 32, EVAL_SEED, CPU, "val")  # the same batches, one per pass
    targets = [loader.next_batch()[1].flatten().tolist() for _ in range(4)]
    assert score.bytes == sum(len(tok.decode(t).encode("utf-8")) for t in targets)
    assert score.bpb == pytest.approx(score.nats / math.log(2) / score.bytes)
    assert score.bytes > score.tokens  # multi-byte characters weigh more than one byte


def test_a_char_models_bpb_on_ascii_text_is_its_loss_over_ln2(char_data_dir):
    dataset = char_data_dir / "shakespeare_char"
    meta = read_meta(dataset)
    tokens = np.memmap(dataset / "val.bin", dtype=meta["dtype"], mode="r")
    lengths = token_byte_lengths(meta["tokenizer"], CPU).numpy()
    score = evaluate(tiny_gpt(meta["vocab_size"]), tokens, lengths)
    assert score.bytes == score.tokens  # ASCII: one byte per character
    assert score.bpb == pytest.approx(score.loss / math.log(2) * score.tokens / score.bytes,
                                      rel=1e-12)


def test_without_byte_lengths_only_the_loss_is_measured():
    tok = CharTokenizer(list(MULTI_BYTE))
    score = evaluate(tiny_gpt(4), tok.encode_array(MULTI_BYTE * 100, np.uint16), None)
    assert score.bytes is None and score.bpb is None and score.loss > 0


# ------------------------------------------------------------------ where it is carried

def test_training_logs_bpb_at_every_eval_and_records_the_best(tiny_run):
    evals = read_metrics(tiny_run).eval
    assert evals and all({"train_bpb", "val_bpb"} <= row.keys() for row in evals)
    for row in evals:  # tiny Shakespeare is ASCII: one byte per character
        assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2), rel=1e-5)
        assert row["train_bpb"] == pytest.approx(row["train_loss"] / math.log(2), rel=1e-5)
    info = read_run_info(tiny_run)
    best = min(evals, key=lambda r: r["val_loss"])
    assert info.best_val_bpb == pytest.approx(best["val_bpb"])


def test_the_console_eval_line_carries_bpb_and_parses_back():
    line = format_eval_line(250, 1.9543, 2.0516, 2.8195, 2.9598)
    assert line == "eval 250: train loss 1.9543, val loss 2.0516 | bpb train 2.8195, val 2.9598"
    row = parse_log(line).eval[0]
    assert (row["train_bpb"], row["val_bpb"]) == (2.8195, 2.9598)
    assert format_eval_line(1, 2.0, 3.0) == "eval 1: train loss 2.0000, val loss 3.0000"
    assert parse_log("eval 1: train loss 2.0000, val loss 3.0000").eval[0]["val_bpb"] is None


def test_plot_metric_bpb_draws_the_eval_bits_per_byte(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "tiny")
    assert folio_main(["plot", str(run), "--metric=bpb", "-o", str(tmp_path / "bpb.png")]) == 0
    assert (tmp_path / "bpb.png").stat().st_size > 0
    fig = make_figure(make_chart([read_metrics(run)], metric="bpb"))
    lines = {line.get_gid(): line for line in fig.axes[0].get_lines()}
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert lines["tiny:val"].get_ydata().tolist() == [r["val_bpb"] for r in evals]
    assert lines["tiny:train"].get_ydata().tolist() == [r["train_bpb"] for r in evals]
    assert fig.axes[0].get_ylabel() == "bits per byte"
    assert "val bpb (best" in fig.axes[0].get_legend().get_texts()[-1].get_text()


def test_plot_metric_bpb_of_a_run_without_bpb_is_a_one_line_error(tmp_path, capsys):
    log = tmp_path / "nanogpt.log"
    log.write_text("step 0: train loss 4.2, val loss 4.3\niter 1: loss 4.1, time 10.0ms\n")
    assert folio_main(["plot", str(log), "--metric=bpb", "-o", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err
    assert "has no bits per byte" in err and "--metric=loss" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_resume_state_keeps_the_best_bpb(tmp_path):
    from folio.store import checkpoint

    state = checkpoint.ResumeState(iter_num=3, best_val_loss=1.5, best_val_bpb=2.25,
                                   model={"w": torch.zeros(2)}, optimizer={"state": {},
                                                                           "param_groups": []})
    checkpoint.save_resume(tmp_path, state)
    assert checkpoint.load_resume(tmp_path).best_val_bpb == 2.25
