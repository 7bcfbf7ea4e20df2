"""`folio eval` on a chat dataset scores what training's masked val loss scores: the assistant's
targets only (tokens and bytes), each conversation seen alone, in windows of whole
conversations."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from folio.cli import main
from folio.config import PrepareConfig
from folio.data.chat_prepare import prepare_chat
from folio.data.loader import ChatTokens, open_split
from folio.data.tokenizer import read_meta, tokenizer_from_spec
from folio.errors import DataError
from folio.model.gpt import GPT, GPTConfig
from folio.store.rundir import read_evals
from folio.train.eval_run import conversation_windows, score_tokens
from folio.train.evaluate import estimate_loss

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """Conversations of varied lengths (a user's fruit names, the assistant's answer "o" to
    "oooo", some with a system turn), prepared with a char vocabulary."""
    tmp = tmp_path_factory.mktemp("evalchat")
    rng = random.Random(1)
    words = "apple pear plum fig kiwi lime".split()
    lines = []
    for i in range(60):
        messages = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 3)))},
                    {"role": "assistant", "content": "o" * rng.randint(1, 4)}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "fruit"})
        lines.append(json.dumps({"messages": messages}))
    conv = tmp / "fruit.jsonl"
    conv.write_text("\n".join(lines) + "\n", "utf-8")
    prepare_chat(PrepareConfig(dataset=str(conv), format="chat", data_dir=str(tmp / "data"),
                               val_fraction=0.25))
    return tmp / "data" / "fruit"


def split_and_bytes(chat_dir: Path, split: str = "val") -> tuple[ChatTokens, np.ndarray]:
    meta = read_meta(chat_dir)
    return open_split(chat_dir, split, meta), tokenizer_from_spec(meta["tokenizer"]).token_bytes()


def tiny_model(vocab_size: int, block_size: int, rope: bool) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2,
                         n_embd=32, rope=rope)).eval()


def by_hand(model: GPT, split: ChatTokens, token_bytes: np.ndarray, last: int
            ) -> tuple[float, int, int, float]:
    """(summed nats, targets, bytes, unmasked mean loss) over the conversations that end by
    position `last`, each run through the model alone, F.cross_entropy on the assistant's
    targets only."""
    bounds = [*split.conversations.tolist(), len(split)]
    nats, count, n_bytes, everything = 0.0, 0, 0, []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b - 1 > last:
            break
        ids = torch.from_numpy(np.asarray(split.tokens[a:b], np.int64))
        with torch.no_grad():
            logits = model.logits(model.hidden(ids[None, :-1]))[0]  # alone, from position 0
        loss = F.cross_entropy(logits, ids[1:], reduction="none")  # (b - a - 1,)
        mine = torch.from_numpy(split.mask[a + 1:b] == 1)
        nats += loss[mine].double().sum().item()
        count += int(mine.sum())
        n_bytes += int(token_bytes[ids[1:][mine].numpy()].sum())
        everything.append(loss)
    return nats, count, n_bytes, torch.cat(everything).mean().item()


@pytest.mark.parametrize("rope", [False, True])
def test_chat_eval_scores_only_the_assistant_targets_each_conversation_alone(chat_dir, rope):
    split, token_bytes = split_and_bytes(chat_dir)
    model = tiny_model(len(token_bytes), 96, rope)
    # windows of several whole conversations, read up to the end of the split
    score = score_tokens(model, split, token_bytes, 10 ** 6, CPU, "val")
    assert score.scored == "assistant" and score.windows > 2
    assert score.tokens == int(split.mask.sum())  # every assistant target, nothing else
    nats, count, n_bytes, unmasked = by_hand(model, split, token_bytes, len(split) - 1)
    assert (score.tokens, score.bytes) == (count, n_bytes)
    assert score.loss == pytest.approx(nats / count, rel=1e-5)
    assert score.bpb == pytest.approx(nats / n_bytes / np.log(2), rel=1e-5)
    assert unmasked != pytest.approx(score.loss, rel=1e-3)
    assert score.loss_ci is not None and score.loss_ci > 0


def test_a_model_that_predicts_the_answers_scores_low_only_with_the_mask(chat_dir):
    # every position predicts "o" (the answers' letter, no fruit has one) at 10 nats over the
    # rest: the assistant's targets cost ~0 (each "o") or ~10 (its <|end|>), the others ~10
    split, token_bytes = split_and_bytes(chat_dir)
    model = tiny_model(len(token_bytes), 40, rope=True)
    o = tokenizer_from_spec(read_meta(chat_dir)["tokenizer"]).encode("o")[0]
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # the final hidden state: ln_f's bias, always
        model.transformer.ln_f.bias.copy_(torch.ones(32))
        model.lm_head.weight.zero_()
        model.lm_head.weight[o] = 10 / 32
    score = score_tokens(model, split, token_bytes, 10 ** 6, CPU, "val")
    answers = int(split.mask.sum())
    ends = answers - int((np.asarray(split.tokens[:]) == o).sum())  # one <|end|> an answer
    assert score.loss == pytest.approx(ends * 10 / answers, rel=0.01)  # < 4: most are "o"s
    unmasked = score_tokens(model, split.tokens, token_bytes, 10 ** 6, CPU, "val")
    assert unmasked.loss > 8 > 4 > score.loss


def test_chat_eval_counts_the_mask_over_the_first_targets_read(chat_dir):
    split, token_bytes = split_and_bytes(chat_dir)
    model = tiny_model(len(token_bytes), 40, rope=True)
    limit = 150  # targets read: positions 1..150, the last conversation cut at 150
    score = score_tokens(model, split, token_bytes, limit, CPU, "val")
    assert split.conversations[0] == 0
    assert score.tokens == int(split.mask[1:limit + 1].sum())
    # and a score over every target would count them all: the mask is what leaves them out
    unmasked = score_tokens(model, split.tokens, token_bytes, limit, CPU, "val")
    assert unmasked.tokens == limit > score.tokens and unmasked.scored == "all"


def test_a_window_without_assistant_targets_is_one_line_error(chat_dir):
    split, token_bytes = split_and_bytes(chat_dir)
    model = tiny_model(len(token_bytes), 40, rope=False)
    with pytest.raises(DataError, match="no assistant token among its first 3 targets") as e:
        score_tokens(model, split, token_bytes, 3, CPU, "val")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("rope", [False, True])
def test_chat_eval_agrees_with_the_training_evaluation(chat_dir, rope):
    # a block of the split's length less one: training's evaluation draws the one window that
    # starts at a conversation and fits (the whole split), as folio eval reads it
    split, token_bytes = split_and_bytes(chat_dir)
    block = len(split) - 1
    model = tiny_model(len(token_bytes), block, rope)
    score = score_tokens(model, split, token_bytes, 10 ** 6, CPU, "val")
    train_eval = estimate_loss(model, {"val": split}, 1, 2, block, CPU, contextlib.nullcontext,
                               token_bytes=torch.from_numpy(token_bytes),
                               doc_start=split.start_id)["val"]
    assert score.windows == 1
    assert train_eval.tokens == 2 * score.tokens  # the same window twice in the batch
    assert score.loss == pytest.approx(train_eval.loss, rel=1e-5)
    assert score.bpb == pytest.approx(train_eval.bpb, rel=1e-5)


def test_conversation_windows_hold_whole_conversations():
    # conversations at 0, 5, 9 (11 tokens, longer than a window of 8 targets), 20, 24; n=30
    starts, n = np.array([0, 5, 9, 20, 24]), 30
    firsts, ends = conversation_windows(starts, n, 8, 10 ** 6)
    # the first two (targets 1..8), the long one's first 8 targets (the rest is not scored),
    # the fourth and the fifth's opening token as a target, the fifth to the end
    assert firsts.tolist() == [0, 9, 20, 24] and ends.tolist() == [8, 17, 24, 29]
    firsts, ends = conversation_windows(starts, n, 8, 12)  # 8 targets, then 4 more
    assert firsts.tolist() == [0, 9] and ends.tolist() == [8, 13]


def test_folio_eval_of_a_chat_run_says_it_scores_assistant_tokens(chat_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=40",
                 "--batch_size=4", "--device=cpu", "--compile=False", "--dtype=float32",
                 "--eval_iters=1", "--max_iters=1", "--recipe=nanogpt", "--task=chat",
                 f"--data_dir={chat_dir.parent}", f"--dataset={chat_dir.name}",
                 f"--out_dir={out}"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--device=cpu"]) == 0
    line = capsys.readouterr().out.strip()
    row = read_evals(out)[-1]
    split = open_split(chat_dir, "val", read_meta(chat_dir))
    assert row["scored"] == "assistant" and row["tokens"] == int(split.mask.sum())
    assert f"(val): {row['tokens']:,} assistant tokens (" in line
