"""Generation's memory: each block's keys and values so far, in buffers allocated once.

`GPT.forward(idx, cache=cache)` continues the sequences the cache holds; the attention
layers write into it and read from it, and positions come from its length. A `KVCache`'s rows
all have one length; a `RowCache`'s rows each have their own (many requests decoded in one
forward pass, each at its own position), so its attention needs a mask.
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

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor) -> KVCache:
        """An empty cache writing into given buffers (n_layer, B, nh, capacity, hs), e.g. a
        view of some rows of a `RowCache`."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.length = keys, values, 0
        cache.capacity = keys.size(3)
        return cache

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """Positions (T,) of T new tokens, the same in every row."""
        return torch.arange(self.length, self.length + T, dtype=torch.long, device=device)

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

    def mask(self, T: int) -> torch.Tensor | None:
        """None: T new queries at the end of every row, the plain causal pattern."""
        return None

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


class RowCache:
    """Keys and values of independent sequences (rows), each with its own length.

    A forward pass of idx (B, T) covers rows 0..B-1 (B = `rows`) and puts row b's T new
    tokens at positions lengths[b]..lengths[b]+T-1; attention reads each row's own positions
    through `mask`. Rows are added at the end and removed by moving the last row into the
    freed slot, so the rows in use are always 0..rows-1 and a step reads them as views.
    A row is (re)filled from position 0 through `refill`, a `KVCache` over its slot.
    Make one with `GPT.new_cache(rows=True)`; its slots grow as rows are added.
    """

    def __init__(self, n_layer: int, n_head: int, head_size: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self._shape = (n_layer, n_head, capacity, head_size)
        self.keys = torch.zeros(n_layer, 0, n_head, capacity, head_size, dtype=dtype,
                                device=device)
        self.values = torch.zeros_like(self.keys)
        self.lengths: list[int] = []  # positions filled in each row in use
        # this forward pass's positions, key slots and mask, built once for all its layers
        self._positions: torch.Tensor | None = None
        self._where: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.keys.size(3)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """The longest row's filled positions."""
        return max(self.lengths, default=0)

    def add_row(self) -> int:
        """A new empty row at the end (the slots grow, doubling, when all are in use); its
        index."""
        if self.rows == self.keys.size(1):
            n_layer, n_head, capacity, head_size = self._shape
            slots = max(1, 2 * self.rows)
            keys = self.keys.new_zeros(n_layer, slots, n_head, capacity, head_size)
            values = torch.zeros_like(keys)
            keys[:, :self.rows], values[:, :self.rows] = self.keys, self.values
            self.keys, self.values = keys, values
        self.lengths.append(0)
        self._changed()
        return self.rows - 1

    def remove_row(self, row: int) -> None:
        """Free `row`: the last row moves into its slot (its keys, values and length)."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            self.keys[:, row, :, :n] = self.keys[:, last, :, :n]
            self.values[:, row, :, :n] = self.values[:, last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()
        self._changed()

    def refill(self, start: int, stop: int) -> KVCache:
        """A `KVCache` over rows start..stop-1 from position 0, to prefill them together in
        a forward pass of their own; then `filled` records what it wrote."""
        return KVCache.over(self.keys[:, start:stop], self.values[:, start:stop])

    def filled(self, start: int, stop: int, length: int) -> None:
        """Rows start..stop-1 now hold `length` positions (after a `refill` pass)."""
        self.lengths[start:stop] = [length] * (stop - start)
        self._changed()

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """Positions (B, T) of T new tokens in each row: right after what the row holds."""
        if self._positions is None or self._positions.size(1) != T:
            self._changed()
            starts = torch.tensor(self.lengths, dtype=torch.long, device=device)
            self._positions = starts[:, None] + torch.arange(T, device=device)  # (B, T)
        return self._positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store block `layer`'s new keys and values (B, nh, T, hs) at each row's positions;
        return that block's keys and values of rows 0..B-1 up to the longest row, each
        (B, nh, S, hs) with S = length + T; positions past a row's end are masked."""
        B, T, hs = k.size(0), k.size(2), k.size(3)
        if B != self.rows:
            raise ValueError(f"a forward pass of {B} rows over a RowCache of {self.rows}")
        slots = self._slots(T, k.device)  # (B * nh * T,)
        self.keys[layer].view(-1, hs).index_copy_(0, slots, k.reshape(-1, hs).to(self.keys))
        self.values[layer].view(-1, hs).index_copy_(0, slots, v.reshape(-1, hs).to(self.keys))
        end = self.length + T
        return self.keys[layer, :B, :, :end], self.values[layer, :B, :, :end]

    def _slots(self, T: int, device: torch.device) -> torch.Tensor:
        """Where the new keys (B, nh, T) go, as rows of one layer's buffer seen as
        (slots * nh * capacity, hs)."""
        pos = self.positions(T, device)  # (B, T)
        if self._where is None:
            _, n_head, capacity, _ = self._shape
            heads = torch.arange(self.rows * n_head, device=device) * capacity
            self._where = (heads.view(self.rows, n_head, 1) + pos[:, None, :]).flatten()
        return self._where

    def mask(self, T: int) -> torch.Tensor | None:
        """What attention adds to the scores (B, 1, T, S): 0 where row b's query t sees a key
        (positions 0..lengths[b]+t: its own row's past and itself), -inf elsewhere; None when
        every row has one length (the plain causal pattern, as a `KVCache`'s)."""
        if min(self.lengths) == max(self.lengths):
            return None
        pos = self.positions(T, self.keys.device)  # (B, T)
        if self._mask is None:
            keys = torch.arange(self.length + T, device=pos.device)  # (S,)
            hidden = keys[None, None, None, :] > pos[:, None, :, None]
            self._mask = torch.zeros(hidden.shape, dtype=self.keys.dtype,
                                     device=pos.device).masked_fill_(hidden, float("-inf"))
        return self._mask

    def advance(self, n: int) -> None:
        """Count n more positions as filled in every row (after every block stored them). A
        pass of n tokens (every decoding step: n = 1) leaves its positions and key slots for
        the next pass of n, moved on by n in place (rebuilding them cost ~60 us a step); the
        mask is rebuilt, the keys having grown."""
        self.lengths = [n + length for length in self.lengths]
        self._mask = None
        if self._positions is not None and self._positions.size(1) == n:
            self._positions.add_(n)
            if self._where is not None:
                self._where.add_(n)
        else:
            self._changed()

    def _changed(self) -> None:
        """The lengths changed: the next forward pass builds its positions and mask anew."""
        self._mask = self._positions = self._where = None


def positions(cache: KVCache | RowCache | None, T: int, device: torch.device
              ) -> torch.Tensor:
    """Positions of T new tokens: (T,) right after what a `KVCache` holds, or 0..T-1 without
    one; (B, T) for a `RowCache`, each row's own."""
    if cache is None:
        return torch.arange(T, dtype=torch.long, device=device)
    return cache.positions(T, device)
