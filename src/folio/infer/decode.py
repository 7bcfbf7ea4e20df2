"""Next-token logits for a window of tokens: incrementally with a KV cache, or by recompute;
and for many windows at once, one forward pass per step over all of them.

All run the model's own forward pass; the cached decoder keeps a `KVCache` (model/cache.py)
while the window only grows, and starts it again when the window slides. The batch decoder
keeps a `RowCache`: each row (a request's window) at its own position.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

import torch
from torch import nn

from folio.model.gpt import GPT
from folio.speed.packed import decoding_copy

# When the window outgrows block_size, drop this fraction of it (at least one token) and
# rebuild the cache from the rest: one batched prefill per block_size // 4 new tokens instead
# of one per token (learned absolute positions make a one-token slide a full recompute).
# Every token still sees at least 3/4 of block_size tokens of context once that many exist.
SLIDE_FRACTION = 0.25


def slide(window: list[int], block_size: int) -> list[int]:
    """`window` as it is, or when it outgrew block_size, its last tokens after dropping
    SLIDE_FRACTION of block_size (at least one)."""
    if len(window) <= block_size:
        return window
    keep = max(1, block_size - max(1, int(block_size * SLIDE_FRACTION)))
    return window[-keep:]


def decoding_model(model: GPT) -> GPT:
    """The model to decode with: a plain model on a CPU decodes through its decoding copy
    (speed/packed.py: a float32 cache and a (C, V) head, 2-3x faster for a 50k vocabulary);
    `folio sample` and `folio serve` pass one already. Compiled or not:
    model.compile(dynamic=True) covers the cached step."""
    if type(model.lm_head) is nn.Linear and model.lm_head.weight.device.type == "cpu":
        return decoding_copy(model, pack=False)
    return model


class CachedDecoder:
    """Logits after a window of tokens, reusing the cache while the window only grows."""

    def __init__(self, model: GPT) -> None:
        self.model = decoding_model(model)
        self.cache = self.model.new_cache()
        self.tokens: list[int] = []  # what the cache holds
        self.device = self.model.transformer.wte.weight.device

    @torch.no_grad()  # not inference_mode: torch.compile cannot write into inference tensors
    def __call__(self, window: list[int]) -> torch.Tensor:
        """Logits (V,) for the token after `window` (at most block_size tokens)."""
        n = len(self.tokens)
        if not (n < len(window) and window[:n] == self.tokens):
            self.cache.reset()  # a new or cropped window: rebuild
            self.tokens, n = [], 0
        new = torch.tensor([window[n:]], dtype=torch.long, device=self.device)  # (1, T)
        logits = self.model(new, cache=self.cache)  # (1, V)
        self.tokens = list(window)
        return logits[0]


class RecomputeDecoder:
    """Logits after a window of tokens by a full forward pass each time, as nanoGPT does."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.device = model.transformer.wte.weight.device

    @torch.no_grad()
    def __call__(self, window: list[int]) -> torch.Tensor:
        idx = torch.tensor([window], dtype=torch.long, device=self.device)  # (1, T)
        return self.model(idx)[0]  # (V,)


Owner = TypeVar("Owner")


class BatchDecoder(Generic[Owner]):
    """Logits for many windows (rows) at once: each `step` is one forward pass of one token per
    row, every row at its own position, after a prefill of the rows that are new or slid.

    A row's window grows by `push` and slides as `generate_tokens` slides it (`slide`), so a
    row decodes the windows a `CachedDecoder` would. Rows are added at the end; removing one
    moves the last into its place (`owners` follows), so rows stay 0..rows-1.
    """

    def __init__(self, model: GPT) -> None:
        self.model = decoding_model(model)
        self.block_size = self.model.config.block_size
        self.cache = self.model.new_cache(rows=True)
        self.owners: list[Owner] = []  # whatever the caller keeps per row, in row order
        self._windows: list[list[int]] = []  # each row's context of its next token
        self._stale: list[bool] = []  # the row's cache does not hold its window[:-1] yet
        self.device = self.model.transformer.wte.weight.device

    @property
    def rows(self) -> int:
        return len(self.owners)

    def add(self, prompt_ids: list[int], owner: Owner) -> None:
        """A new row decoding after `prompt_ids` (its last block_size tokens; not empty)."""
        if not prompt_ids:
            raise ValueError("a row needs at least one prompt token")
        self.cache.add_row()
        self.owners.append(owner)
        self._windows.append(list(prompt_ids[-self.block_size:]))
        self._stale.append(True)

    def push(self, row: int, token: int) -> None:
        """Append the token sampled for `row` to its window (which may slide)."""
        window = self._windows[row]
        window.append(token)
        if len(window) > self.block_size:  # slid: the row's cache is filled again
            self._windows[row] = slide(window, self.block_size)
            self._stale[row] = True

    def remove(self, rows: Iterable[int]) -> None:
        """Drop these rows; each removal moves the last row into the freed place."""
        for row in sorted(set(rows), reverse=True):
            self.cache.remove_row(row)
            for items in (self.owners, self._windows, self._stale):
                items[row] = items[-1]
                items.pop()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Logits (rows, V) of the token after each row's window."""
        n = len(self._windows[0]) if self.rows else 0
        if all(self._stale) and all(len(w) == n for w in self._windows):
            # every row (re)starts with a window of one length (a lone request, or requests
            # that began or slid together): one pass over the whole windows gives the logits,
            # where a prefill and then a step would take two (one in 16 steps of the char
            # model at block 64 is a slide); it is also the unbatched decoder's own pass
            idx = torch.tensor(self._windows, dtype=torch.long, device=self.device)  # (B, n)
            logits = self.model(idx, cache=self.cache.refill(0, self.rows))  # (B, V)
            self.cache.filled(0, self.rows, n)
            self._stale = [False] * self.rows
            return logits
        self._prefill()
        last = torch.tensor([[w[-1]] for w in self._windows], dtype=torch.long,
                            device=self.device)  # (B, 1)
        return self.model(last, cache=self.cache)  # (B, V)

    def _prefill(self) -> None:
        """Fill the stale rows' caches with their windows but the last token (which the step
        feeds): consecutive rows of one length in one forward pass of their own."""
        row = 0
        while row < self.rows:
            n = len(self._windows[row]) - 1
            end = row + 1
            if self._stale[row]:
                while (end < self.rows and self._stale[end]
                       and len(self._windows[end]) - 1 == n):
                    end += 1
                if n:
                    idx = torch.tensor([w[:-1] for w in self._windows[row:end]],
                                       dtype=torch.long, device=self.device)  # (R, n)
                    self.model.hidden(idx, self.cache.refill(row, end))
                self.cache.filled(row, end, n)
                self._stale[row:end] = [False] * (end - row)
            row = end
