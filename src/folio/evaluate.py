"""Loss estimation on a fixed set of batches, so numbers compare across evals and runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from folio.loader import Loader

EVAL_SEED = 20240601  # the same eval batches every time, independent of the training stream


@torch.no_grad()  # not inference_mode: FSDP reuses buffers gathered here when training
def estimate_loss(model: torch.nn.Module, splits: dict[str, np.ndarray], eval_iters: int,
                  batch_size: int, block_size: int, device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager], seed_offset: int = 0
                  ) -> dict[str, float]:
    """Mean loss over `eval_iters` fixed batches of each split (model left in train mode)."""
    model.eval()
    losses = {}
    for name, tokens in splits.items():
        loader = Loader(tokens, batch_size, block_size, EVAL_SEED + seed_offset, device, name)
        total = torch.zeros((), device=device)
        for _ in range(eval_iters):
            x, y = loader.next_batch()
            with autocast():
                _, loss = model(x, y)
            total += loss.float()
        losses[name] = (total / eval_iters).item()  # one host sync per split
    model.train()
    return losses
