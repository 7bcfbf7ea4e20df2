"""Loss and bits per byte on a fixed set of batches, so numbers compare across evals, runs and
tokenizers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from folio.data.loader import make_loader
from folio.data.tokenizer import tokenizer_from_spec
from folio.machine import distributed

EVAL_SEED = 20240601  # the same eval batches every time, independent of the training stream
CPU_EVAL_TOKENS = 8192  # tokens per forward pass when small eval batches are stacked on a CPU


@dataclass
class Score:
    """One split's evaluation: summed loss over its target tokens and their UTF-8 bytes."""

    nats: float  # summed cross-entropy (natural log) over the target tokens
    tokens: int  # target tokens scored
    bytes: int | None  # UTF-8 bytes of those targets; None when the tokenizer is unknown

    @property
    def loss(self) -> float:
        """Mean loss per token (nats)."""
        return self.nats / self.tokens

    @property
    def bpb(self) -> float | None:
        """Bits per byte: the summed loss over the targets' bytes, in bits; a number that
        compares across tokenizers. None without byte lengths (or bytes)."""
        if not self.bytes:
            return None
        return self.nats / (self.bytes * math.log(2))


def token_byte_lengths(spec: dict, device: torch.device) -> torch.Tensor:
    """The UTF-8 byte length of each token id (vocab_size,) of the tokenizer `spec` (a
    meta.json entry) on `device`; special tokens count 0. A DataError when that tokenizer
    cannot be loaded here (an hf: directory moved away, say)."""
    return torch.from_numpy(tokenizer_from_spec(spec).token_bytes()).to(device)


def batches_per_pass(eval_iters: int, batch_size: int, block_size: int, max_tokens: int) -> int:
    """How many eval batches to stack into one forward pass: the largest divisor of
    `eval_iters` whose stack holds at most `max_tokens` tokens (at least 1)."""
    fit = min(eval_iters, max_tokens // (batch_size * block_size))
    return max((k for k in range(1, fit + 1) if eval_iters % k == 0), default=1)


@torch.no_grad()  # not inference_mode: FSDP reuses buffers gathered here when training
def estimate_loss(model: torch.nn.Module, splits: dict[str, np.ndarray], eval_iters: int,
                  batch_size: int, block_size: int, device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager], seed_offset: int = 0,
                  max_tokens: int = 0, token_bytes: torch.Tensor | None = None,
                  doc_start: int | None = None) -> dict[str, Score]:
    """Loss over `eval_iters` fixed batches of each split (model left in train mode), and
    with `token_bytes` (each id's byte length) the bytes its targets stand for.

    With `max_tokens`, batches are stacked into fewer, larger forward passes (the same batches,
    the same mean up to float rounding): small matmuls waste most of a CPU's time. Targets of
    -1 (a chat dataset's tokens that are not the assistant's) are not scored: each pass's mean
    loss counts as many times as it scored targets. `doc_start`: as in training, the token
    opening each packed conversation (attention within one only), or None.
    """
    stack = batches_per_pass(eval_iters, batch_size, block_size, max_tokens)
    passes = eval_iters // stack
    model.eval()
    scores = {}
    for name, tokens in splits.items():
        loader = make_loader(tokens, batch_size * stack, block_size, EVAL_SEED + seed_offset,
                             device, name)
        total = torch.zeros((), device=device)
        n_tokens = torch.zeros((), dtype=torch.int64, device=device)
        n_bytes = torch.zeros((), dtype=torch.int64, device=device)
        for _ in range(passes):
            x, y = loader.next_batch()  # (stack * B, T): the next `stack` batches
            with autocast():
                loss = model(x, y, doc_start=doc_start)
            scored = y != -1  # (stack * B, T)
            count = scored.sum()
            total += loss.float() * count
            n_tokens += count
            if token_bytes is not None:
                n_bytes += (token_bytes[y.clamp(min=0)] * scored).sum()
        # host syncs: one per split for the loss, one for the count, one for the bytes
        scores[name] = Score(total.item(), int(n_tokens.item()),
                             None if token_bytes is None else n_bytes.item())
    model.train()
    return scores


def all_reduce_scores(scores: dict[str, Score], info: distributed.DistInfo
                      ) -> dict[str, Score]:
    """Every rank's scores summed (each rank scored its own batches): the same on all ranks."""
    out = {}
    for name, s in scores.items():
        nats, tokens, n_bytes = distributed.all_reduce_sums(
            [s.nats, float(s.tokens), float(s.bytes or 0)], info)
        out[name] = Score(nats, int(tokens), None if s.bytes is None else int(n_bytes))
    return out
