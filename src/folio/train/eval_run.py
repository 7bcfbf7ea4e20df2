"""`folio eval RUN`: a trained model's loss and bits per byte on a fixed number of tokens of any
text or prepared dataset, with 95% confidence intervals, so runs (and tokenizers) compare.

The tokens are read from the start of the text (or of the dataset's split) in consecutive
windows of the model's block_size: each token after the first is a target once, with the
window's earlier tokens as its context. The windows are the samples of the intervals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from folio.config import EvalConfig
from folio.data.loader import open_tokens
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
                ) -> tuple[str, np.ndarray]:
    """(label, token ids) of what to score: a prepared dataset's split (its tokenizer must be
    the run's), or any text folio reads, encoded with the run's tokenizer until enough."""
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
        return f"{data} ({cfg.split})", open_tokens(Path(data), cfg.split, meta)
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
def score_tokens(model: GPT, tokens: np.ndarray, token_bytes: np.ndarray, max_tokens: int,
                 device: torch.device, label: str = "text") -> TextScore:
    """Loss and bits per byte of the first `max_tokens` targets of `tokens` (fewer if it is
    shorter), in consecutive windows of the model's block_size (the last one holds the rest),
    with 95% intervals over the windows."""
    if len(tokens) < 2:
        raise DataError(f"{label} has {len(tokens)} token(s): too short to score; give more "
                        "text")
    T = model.config.block_size
    targets = min(max_tokens, len(tokens) - 1)
    sizes = [min(T, targets - start) for start in range(0, targets, T)]  # targets per window
    per_pass = max(1, LOGIT_ELEMENTS // (T * model.config.vocab_size))
    lengths = torch.from_numpy(np.asarray(token_bytes, dtype=np.int64))
    nats, n_bytes = np.zeros(len(sizes)), np.zeros(len(sizes), dtype=np.int64)
    full = len(sizes) - (sizes[-1] < T)  # windows of T targets; a shorter last one goes alone
    groups = [range(a, min(a + per_pass, full)) for a in range(0, full, per_pass)]
    groups += [range(full, len(sizes))] if full < len(sizes) else []
    for group in groups:
        n = sizes[group[0]]
        chunk = np.stack([np.asarray(tokens[w * T:w * T + n + 1], np.int64) for w in group])
        x = torch.from_numpy(chunk[:, :-1]).to(device)  # (windows, n)
        y = torch.from_numpy(chunk[:, 1:])  # (windows, n), on the CPU
        logits = model.logits(model.hidden(x)).float()  # (windows, n, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten().to(device), reduction="none")
        nats[list(group)] = loss.view(len(group), n).double().sum(1).cpu().numpy()
        n_bytes[list(group)] = lengths[y].sum(1).numpy()
    loss_mean, loss_ci = _ratio(nats, np.array(sizes, dtype=float))
    bpb, bpb_ci = (None, None)
    if n_bytes.sum():
        bpb, bpb_ci = _ratio(nats / math.log(2), n_bytes.astype(float))
    return TextScore(label, targets, int(n_bytes.sum()), len(sizes), T, loss_mean, loss_ci,
                     bpb, bpb_ci)


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

    return (f"eval {run} on {s.data}: {s.tokens:,} tokens ({s.bytes:,} bytes) in "
            f"{s.windows:,} window(s) of {s.window:,} | loss {pm(s.loss, s.loss_ci)} | bpb "
            f"{pm(s.bpb, s.bpb_ci)} (95% intervals)")
