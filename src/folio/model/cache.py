"""Generation's memory: each block's keys and values so far, in buffers allocated once.

`GPT.forward(idx, cache=cache)` continues the sequences the cache holds; the attention
layers write into it and read from it, and positions come from its length.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every block for a batch of sequences, preallocated to `capacity`.

    Positions 0..length-1 are filled. A forward pass of T new tokens puts them at positions
    length..length+T-1 and then advances `length` by T. Make one with `GPT.new_cache()`.
    """

    def __init__(self, n_layer: int, n_head: int, head_size: int, capacity: int,
                 batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (n_layer, batch_size, n_head, capacity, head_size)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0  # positions filled so far

    @property
    def capacity(self) -> int:
        return self.keys.size(3)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store block `layer`'s new keys and values (B, nh, T, hs) after the filled positions;
        return all of that block's keys and values so far, each (B, nh, length + T, hs)."""
        start, end = self.length, self.length + k.size(2)
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

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
