"""Next-token logits for a window of tokens: incrementally with a KV cache, or by recompute.

The cache runs the model's own layers (ln_1, attn.qkv, attn.project, ln_2, mlp) outside
model.py's training path, keeping each block's keys and values in preallocated buffers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from folio.machine.device import vocab_head
from folio.model.gpt import GPT


class KVCache:
    """Keys and values of every block for a batch of sequences, preallocated to block_size."""

    def __init__(self, model: GPT, batch_size: int = 1) -> None:
        cfg = model.config
        weight = model.lm_head.weight
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.model = model
        self.head = vocab_head(weight)  # what model.lm_head computes, laid out for decoding
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0  # positions filled so far

    @torch.no_grad()  # not inference_mode: torch.compile cannot write into inference tensors
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Append idx (B, T) at positions length..length+T; logits (B, V_padded) of the last."""
        start, T = self.length, idx.size(1)
        end = start + T
        if end > self.keys.size(3):
            raise ValueError(f"KV cache holds {self.keys.size(3)} positions, asked for {end}")
        model = self.model
        x = model.embed(idx, start)  # (B, T, C)
        for i, block in enumerate(model.transformer.h):
            q, k, v = block.attn.qkv(block.ln_1(x))  # (B, nh, T, hs)
            self.keys[i, :, :, start:end] = k
            self.values[i, :, :, start:end] = v
            keys = self.keys[i, :, :, :end]  # (B, nh, end, hs)
            values = self.values[i, :, :, :end]
            x = x + block.attn.project(attend(q, keys, values, start))
            x = x + block.mlp(block.ln_2(x))
        self.length = end
        x = model.transformer.ln_f(x[:, -1, :])  # (B, C)
        return self.head(x)  # (B, V_padded), as model.lm_head(x)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of T new queries (B, nh, T, hs) at positions start.. over all keys."""
    T = q.size(2)
    if T == 1:  # one query may see every cached position: no mask
        return F.scaled_dot_product_attention(q, keys, values)
    if start == 0:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    # query t (position start + t) sees keys 0..start + t
    mask = torch.ones(T, keys.size(2), dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


@functools.cache
def _compiled_cache_forward() -> Callable[[KVCache, torch.Tensor], torch.Tensor]:
    # One compiled function for every cache, so later samples reuse its graphs; dynamic=True
    # gives one graph for all cache lengths instead of one per length.
    return torch.compile(KVCache.forward, dynamic=True)


def compiled_forward(cache: KVCache) -> Callable[[torch.Tensor], torch.Tensor]:
    return functools.partial(_compiled_cache_forward(), cache)


class CachedDecoder:
    """Logits after a window of tokens, reusing the cache while the window only grows."""

    def __init__(self, model: GPT, compile: bool = False) -> None:
        self.cache = KVCache(model)
        self.forward = compiled_forward(self.cache) if compile else self.cache.forward
        self.tokens: list[int] = []  # what the cache holds
        self.device = model.lm_head.weight.device

    def __call__(self, window: list[int]) -> torch.Tensor:
        """Logits (V_padded,) for the token after `window` (at most block_size tokens)."""
        n = len(self.tokens)
        if not (n < len(window) and window[:n] == self.tokens):
            self.cache.length, self.tokens, n = 0, [], 0  # a new or cropped window: rebuild
        new = torch.tensor([window[n:]], dtype=torch.long, device=self.device)  # (1, T)
        logits = self.forward(new)
        self.tokens = list(window)
        return logits[0]


class RecomputeDecoder:
    """Logits after a window of tokens by a full forward pass each time, as nanoGPT does."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.device = model.lm_head.weight.device

    @torch.no_grad()
    def __call__(self, window: list[int]) -> torch.Tensor:
        idx = torch.tensor([window], dtype=torch.long, device=self.device)  # (1, T)
        logits, _ = self.model(idx)  # (1, 1, V_padded)
        return logits[0, -1]
