"""Generation's memory: each block's keys and values so far, in buffers allocated once.

`GPT.forward(idx, cache=cache)` continues the sequences the cache holds; the attention
layers write into it and read from it, and positions come from its length.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every block for a batch of sequences, for up to `capacity` positions.

    Positions 0..length-1 are filled. A forward pass of T new tokens puts them at positions
    length..length+T-1 and then advances `length` by T. Make one with `GPT.new_cache()`. The
    buffers are allocated once for up to PREALLOCATED positions; a longer capacity (an
    imported model's 8k-40k context) starts there and doubles as positions arrive, so a short
    sample of such a model does not hold gigabytes of cache.
    """

    PREALLOCATED = 2048

    def __init__(self, n_layer: int, n_kv_head: int, head_size: int, capacity: int,
                 batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (n_layer, batch_size, n_kv_head, min(capacity, self.PREALLOCATED), head_size)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.capacity = capacity
        self.length = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store block `layer`'s new keys and values (B, nkv, T, hs) after the filled
        positions; return all of that block's keys and values so far, each
        (B, nkv, length + T, hs)."""
        start, end = self.length, self.length + k.size(2)
        if end > self.keys.size(3):
            self._grow(end)
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def _grow(self, end: int) -> None:
        """Room for at least `end` positions (at most capacity), the filled ones kept."""
        size = min(self.capacity, max(end, 2 * self.keys.size(3)))
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], size, old.size(4)))
            new[:, :, :, :old.size(3)] = old
            setattr(self, name, new)

    def advance(self, n: int) -> None:
        """Count n more positions as filled (after every block has stored them)."""
        self.length += n

    def reset(self) -> None:
        """Forget every position (the buffers are reused)."""
        self.length = 0


def positions(cache: KVCache | None, T: int, device: torch.device) -> torch.Tensor:
    """Positions (T,) of T new tokens: right after what `cache` holds, or 0..T-1 without one."""
    start = 0 if cache is None else cache.length
    return torch.arange(start, start + T, dtype=torch.long, device=device)
