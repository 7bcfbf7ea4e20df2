"""Loss estimation on a fixed set of batches, so numbers compare across evals and runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from folio.data.loader import Loader

EVAL_SEED = 20240601  # the same eval batches every time, independent of the training stream
CPU_EVAL_TOKENS = 8192  # tokens per forward pass when small eval batches are stacked on a CPU


def batches_per_pass(eval_iters: int, batch_size: int, block_size: int, max_tokens: int) -> int:
    """How many eval batches to stack into one forward pass: the largest divisor of
    `eval_iters` whose stack holds at most `max_tokens` tokens (at least 1)."""
    fit = min(eval_iters, max_tokens // (batch_size * block_size))
    return max((k for k in range(1, fit + 1) if eval_iters % k == 0), default=1)


@torch.no_grad()  # not inference_mode: FSDP reuses buffers gathered here when training
def estimate_loss(model: torch.nn.Module, splits: dict[str, np.ndarray], eval_iters: int,
                  batch_size: int, block_size: int, device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager], seed_offset: int = 0,
                  max_tokens: int = 0) -> dict[str, float]:
    """Mean loss over `eval_iters` fixed batches of each split (model left in train mode).

    With `max_tokens`, batches are stacked into fewer, larger forward passes (the same batches,
    the same mean up to float rounding): small matmuls waste most of a CPU's time.
    """
    stack = batches_per_pass(eval_iters, batch_size, block_size, max_tokens)
    passes = eval_iters // stack
    model.eval()
    losses = {}
    for name, tokens in splits.items():
        loader = Loader(tokens, batch_size * stack, block_size, EVAL_SEED + seed_offset, device,
                        name)
        total = torch.zeros((), device=device)
        for _ in range(passes):
            x, y = loader.next_batch()  # (stack * B, T): the next `stack` batches
            with autocast():
                loss = model(x, y)
            total += loss.float()
        losses[name] = (total / passes).item()  # one host sync per split
    model.train()
    return losses
