"""Loss estimation: stacking eval batches changes the passes, not the batches or the mean."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from folio.model.gpt import GPT, GPTConfig
from folio.train.evaluate import batches_per_pass, estimate_loss, token_byte_lengths


@pytest.mark.parametrize("eval_iters, batch, block, max_tokens, want", [
    (200, 12, 64, 8192, 10),  # nanoGPT's CPU command: 10 batches of 768 tokens per pass
    (20, 12, 64, 8192, 10),
    (7, 12, 64, 8192, 7),  # every batch in one pass
    (13, 12, 64, 4096, 1),  # a prime larger than what fits: one batch per pass
    (200, 64, 256, 8192, 1),  # one batch is already larger than the budget
    (200, 12, 64, 0, 1),  # no stacking asked for
])
def test_batches_per_pass_divides_eval_iters_within_the_token_budget(
        eval_iters, batch, block, max_tokens, want):
    assert batches_per_pass(eval_iters, batch, block, max_tokens) == want


def test_stacked_eval_gives_the_same_losses_as_one_batch_at_a_time(char_data_dir):
    meta = json.loads((char_data_dir / "shakespeare_char" / "meta.json").read_text())
    splits = {s: np.memmap(char_data_dir / "shakespeare_char" / f"{s}.bin",
                           dtype=meta["dtype"], mode="r") for s in ("train", "val")}
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=meta["vocab_size"], n_layer=2, n_head=2,
                          n_embd=32, dropout=0.1, bias=False))
    kwargs = dict(eval_iters=12, batch_size=4, block_size=32, device=torch.device("cpu"),
                  autocast=contextlib.nullcontext,
                  token_bytes=token_byte_lengths(meta["tokenizer"], torch.device("cpu")))
    one_at_a_time = estimate_loss(model, splits, **kwargs)
    stacked = estimate_loss(model, splits, **kwargs, max_tokens=6 * 4 * 32)  # 2 passes of 6
    assert one_at_a_time.keys() == stacked.keys() == {"train", "val"}
    for split, score in one_at_a_time.items():
        assert stacked[split].loss == pytest.approx(score.loss, rel=1e-6)
        assert (stacked[split].tokens, stacked[split].bytes) == (score.tokens, score.bytes)
    assert model.training  # left in train mode, dropout off while evaluating (same numbers)
