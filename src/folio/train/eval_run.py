"""`folio eval RUN`: a trained model's loss and bits per byte on a fixed number of tokens of any
text or prepared dataset, with 95% confidence intervals, so runs (and tokenizers) compare.

The tokens are read from the start of the text (or of the dataset's split) in consecutive
windows of the model's block_size: each token after the first is a target once, with the
window's earlier tokens as its context. The windows are the samples of the intervals.

A chat dataset (`folio prepare --format=chat`) is scored as training evaluates it: only the
assistant's targets count (tokens and bytes), and each conversation is seen alone (attention
within it, positions from 0). Its windows start at a conversation and hold the whole
conversations that fit after it; one longer than block_size+1 tokens is scored on those first
tokens only, as training truncates it. The per-token losses are training's masked val loss's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from folio.config import EvalConfig
from folio.data.loader import ChatTokens, Shards, open_split, read_windows
from folio.data.texts import source_texts
from folio.data.tokenizer import Tokenizer, read_meta
from folio.errors import DataError
from folio.machine.device import autocast, resolve_device, resolve_dtype
from folio.model.gpt import GPT
from folio.store import rundir
from folio.store.sources import load_model

Z95 = 1.959964  # two-sided 95% normal quantile
LOGIT_ELEMENTS = 1 << 25  # (windows x block x vocab) logits per forward pass: 128 MB float32


@dataclass
class TextScore:
    """What `folio eval` measured."""

    data: str  # what was scored
    tokens: int  # targets scored
    bytes: int  # their UTF-8 bytes
    windows: int
    window: int  # targets per window: the block size (the last window may hold fewer)
    loss: float  # mean nats per target
    loss_ci: float | None  # half-width of its 95% interval (None with one window)
    bpb: float | None
    bpb_ci: float | None
    scored: str = "all"  # which targets count: "all", or "assistant" (a chat dataset)


def evaluate_run(cfg: EvalConfig) -> TextScore:
    """Score cfg.run_dir on cfg.data (default: its dataset's val split), print it and append
    it to the run's evals.jsonl."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer, info = load_model(cfg.run_dir, device)
    label, tokens = eval_tokens(cfg, tokenizer, info, model.config.block_size)
    with autocast(device, dtype):
        score = score_tokens(model, tokens, tokenizer.token_bytes(), cfg.tokens, device,
                             label)
    print(format_score(score, cfg.run_dir), flush=True)
    if (Path(cfg.run_dir) / rundir.RUN_INFO).is_file():
        rundir.append_eval(Path(cfg.run_dir), {**asdict(score), "iter": info.iter_num})
    return score


def eval_tokens(cfg: EvalConfig, tokenizer: Tokenizer, info: rundir.RunInfo, block_size: int
                ) -> tuple[str, np.ndarray | Shards | ChatTokens]:
    """(label, token ids) of what to score: a prepared dataset's split (its tokenizer must be
    the run's; a chat split with its assistant mask), or any text folio reads, encoded with
    the run's tokenizer until enough."""
    data = cfg.data
    if not data:  # the run's own dataset
        if not info.dataset:
            raise DataError(f"{cfg.run_dir} does not say which dataset it was trained on; "
                            "pass --data=SOURCE")
        data = str(Path(info.config.get("data_dir", "data")) / info.dataset)
    if (Path(data) / "meta.json").is_file():
        meta = read_meta(data)
        if meta["tokenizer"] != tokenizer.spec():
            raise DataError(f"dataset {data} was prepared with another tokenizer "
                            f"({meta['tokenizer'].get('kind')}, {meta['vocab_size']:,} tokens) "
                            f"than {cfg.run_dir} ({tokenizer.kind}, {tokenizer.vocab_size:,}); "
                            "pass --data with its text instead, it is encoded for the run")
        return f"{data} ({cfg.split})", open_split(Path(data), cfg.split, meta)
    texts = source_texts(data, text_field=cfg.text_field, include=cfg.include,
                         exclude=cfg.exclude)
    parts, total = [], 0
    for block in texts:
        ids = tokenizer.encode_array(block, np.int64)
        parts.append(ids)
        total += len(ids)
        if total > cfg.tokens + block_size:  # enough: the rest is not read
            break
    return texts.label, np.concatenate(parts) if parts else np.zeros(0, np.int64)


@torch.no_grad()
def score_tokens(model: GPT, tokens: np.ndarray | Shards | ChatTokens, token_bytes: np.ndarray,
                 max_tokens: int, device: torch.device, label: str = "text") -> TextScore:
    """Loss and bits per byte of the first `max_tokens` targets of `tokens` (fewer if it is
    shorter), in consecutive windows of the model's block_size (the last one holds the rest),
    with 95% intervals over the windows. A chat split (ChatTokens): of its first `max_tokens`
    targets in windows of whole conversations (`conversation_windows`), the assistant's,
    each conversation kept apart as in training."""
    if len(tokens) < 2:
        raise DataError(f"{label} has {len(tokens)} token(s): too short to score; give more "
                        "text")
    T = model.config.block_size
    chat = isinstance(tokens, ChatTokens)
    if chat:
        firsts, ends = conversation_windows(tokens.conversations, len(tokens), T, max_tokens)
        if not len(firsts):
            raise DataError(f"{label} holds no conversation; re-run `folio prepare "
                            "--format=chat`")
    else:
        firsts = np.arange(0, min(max_tokens, len(tokens) - 1), T)
        ends = np.minimum(firsts + T, min(max_tokens, len(tokens) - 1))
    # tokens read per window: block_size+1 (fewer at the end of the data); the last one's
    # targets end at its end
    sizes = np.minimum(T + 1, len(tokens) - firsts)
    sizes[-1] = ends[-1] - firsts[-1] + 1
    per_pass = max(1, LOGIT_ELEMENTS // (T * model.config.vocab_size))
    lengths = torch.from_numpy(np.asarray(token_bytes, dtype=np.int64))
    nats, n_bytes = np.zeros(len(firsts)), np.zeros(len(firsts), dtype=np.int64)
    counts = np.zeros(len(firsts), dtype=np.int64)
    for group in _groups(sizes, per_pass):
        where = firsts[group, None] + np.arange(sizes[group[0]])  # (windows, n+1)
        x, y = read_windows(tokens, where)  # (windows, n) each; y: -1 where not scored
        y = y.masked_fill(torch.from_numpy(where[:, 1:] > ends[group, None]), -1)
        hidden = model.hidden(x.to(device), doc_start=tokens.start_id if chat else None)
        logits = model.logits(hidden).float()  # (windows, n, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten().to(device), ignore_index=-1,
                               reduction="none")  # 0 where not scored
        nats[group] = loss.view(len(group), -1).double().sum(1).cpu().numpy()
        scored = y != -1
        counts[group] = scored.sum(1).numpy()
        n_bytes[group] = (lengths[y.clamp(min=0)] * scored).sum(1).numpy()
    if counts.sum() == 0:
        raise DataError(f"{label} has no assistant token among its first "
                        f"{int((ends - firsts).sum()):,} targets; raise --tokens")
    loss_mean, loss_ci = _ratio(nats, counts.astype(float))
    bpb, bpb_ci = (None, None)
    if n_bytes.sum():
        bpb, bpb_ci = _ratio(nats / math.log(2), n_bytes.astype(float))
    return TextScore(label, int(counts.sum()), int(n_bytes.sum()), len(firsts), T, loss_mean,
                     loss_ci, bpb, bpb_ci, "assistant" if chat else "all")


def conversation_windows(starts: np.ndarray, n: int, block_size: int, max_targets: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The windows that read a chat split of n tokens whose conversations begin at `starts`:
    each window's first position (a conversation's start) and its last target, so that it
    scores the whole conversations that fit in block_size targets after it (the first one's
    first block_size targets when it is longer, the rest of it not scored, as training
    truncates it), in order, until max_targets targets are read."""
    bounds = np.append(starts, n)  # (conversations+1,)
    firsts, ends, read, i = [], [], 0, 0
    while i < len(starts) and read < max_targets:
        first = int(starts[i])
        j = int(np.searchsorted(bounds, first + block_size + 1, side="right")) - 1
        # conversations i..j-1 end within the window; none when conversation i is longer
        end = min(int(bounds[j]), first + block_size, n - 1) if j > i else first + block_size
        end = min(end, first + max_targets - read)
        firsts.append(first)
        ends.append(end)
        read += end - first
        i = j if j > i else i + 1
    return np.array(firsts, dtype=np.int64), np.array(ends, dtype=np.int64)


def _groups(sizes: np.ndarray, per_pass: int) -> list[np.ndarray]:
    """Runs of consecutive windows of one size, at most per_pass each: one forward pass."""
    groups, a = [], 0
    for b in range(1, len(sizes) + 1):
        if b == len(sizes) or sizes[b] != sizes[a] or b - a == per_pass:
            groups.append(np.arange(a, b))
            a = b
    return groups


def _ratio(num: np.ndarray, den: np.ndarray) -> tuple[float, float | None]:
    """sum(num) / sum(den) and the half-width of its 95% interval over the samples (the
    ratio estimator's linearised standard error); None with a single sample."""
    r = num.sum() / den.sum()
    n = len(num)
    if n < 2:
        return float(r), None
    residual = num - r * den
    se = math.sqrt((residual ** 2).sum() / (n * (n - 1))) / den.mean()
    return float(r), Z95 * se


def format_score(s: TextScore, run: str) -> str:
    """`eval out on notes/: 65,536 tokens (264,000 bytes) in 64 windows of 1,024 | loss 1.4712
    ± 0.0123 | bpb 2.1234 ± 0.0178 (95% intervals)`."""
    def pm(value: float | None, ci: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}" + (f" ± {ci:.4f}" if ci else "")

    tokens = "tokens" if s.scored == "all" else f"{s.scored} tokens"
    return (f"eval {run} on {s.data}: {s.tokens:,} {tokens} ({s.bytes:,} bytes) in "
            f"{s.windows:,} window(s) of {s.window:,} | loss {pm(s.loss, s.loss_ci)} | bpb "
            f"{pm(s.bpb, s.bpb_ci)} (95% intervals)")
