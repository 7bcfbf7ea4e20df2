"""Next-token logits for a window of tokens: incrementally with a KV cache, or by recompute.

Both run the model's own forward pass; the cached decoder keeps a `KVCache` (model/cache.py)
while the window only grows, and starts it again when the window slides.
"""

from __future__ import annotations

import torch
from torch import nn

from folio.model.gpt import GPT
from folio.speed.packed import decoding_copy


class CachedDecoder:
    """Logits after a window of tokens, reusing the cache while the window only grows."""

    def __init__(self, model: GPT) -> None:
        # compiled or not: model.compile(dynamic=True) covers the cached step. A plain model on
        # a CPU decodes through its decoding copy (speed/packed.py: a float32 cache and a
        # (C, V) head, 2-3x faster for a 50k vocabulary); `folio sample` passes one already.
        if type(model.lm_head) is nn.Linear and model.lm_head.weight.device.type == "cpu":
            model = decoding_copy(model, pack=False)
        self.model = model
        self.cache = model.new_cache()
        self.tokens: list[int] = []  # what the cache holds
        self.device = model.transformer.wte.weight.device

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
