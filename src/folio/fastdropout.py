"""Dropout for CPU training that is cheap to draw and cheap to keep.

PyTorch's CPU dropout draws one Bernoulli sample per element (~10 ns each) and its fused
attention kernels refuse dropout, so attention with dropout falls back to the math path that
keeps several (B, nh, T, T) tensors per layer for backward. Here keep-masks come from 16-bit
slices of 64-bit random words (P(drop) = round(p * 65536) / 65536), regenerated in backward
from a seed drawn from torch's generator (so `torch.manual_seed` and resume still replay
them), and attention recomputes its probabilities in backward, chunk by chunk, like flash
attention does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

CHUNK_BYTES = 4 << 20  # one chunk's float32 (g, T, T) scores: stays in cache
_LEVELS = 1 << 16


def _seed() -> int:
    """A fresh seed from torch's default CPU generator (advances it, like dropout would)."""
    return int(torch.randint(1 << 62, (1,)).item())


def keep_mask(shape: tuple[int, ...], p: float, seed: int) -> torch.Tensor:
    """Bool tensor of `shape`, each element True with probability 1 - p (to 1/65536)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64)
    words.random_(-(1 << 63), None, generator=torch.Generator().manual_seed(seed))  # 64 bits
    threshold = -(_LEVELS // 2) + round(p * _LEVELS)  # int16 values below it are dropped
    return (words.view(torch.int16)[:n] >= threshold).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(tuple(x.shape), p, _seed())
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) with the fast mask (CPU float tensors; else F.dropout)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return nn.functional.dropout(x, p, training)  # compiled code draws its own masks
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """nn.Dropout drawing its mask with `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class _CausalDropoutAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(hs) + causal) with dropout, times v; O(T) memory per row."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float
                ) -> torch.Tensor:
        B, nh, T, hs = q.shape
        ctx.dtype = q.dtype  # bf16 under autocast: computed in float32 here
        qf, kf, vf = (t.float().reshape(B * nh, T, hs) for t in (q, k, v))  # (G, T, hs)
        G = B * nh
        rows = max(1, CHUNK_BYTES // (4 * T * T))
        seed, scale = _seed(), 1.0 / math.sqrt(hs)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)  # (T, T)
        out = torch.empty_like(qf)
        lse = torch.empty(G, T, 1, dtype=torch.float32, device=q.device)
        for i, s in enumerate(range(0, G, rows)):
            e = min(s + rows, G)
            probs = _probs(qf[s:e], kf[s:e], future, scale)  # (g, T, T)
            top = probs.amax(dim=-1, keepdim=True)  # (g, T, 1)
            total = probs.sub_(top).exp_().sum(dim=-1, keepdim=True)
            lse[s:e] = top + total.log()
            probs.mul_(keep_mask(tuple(probs.shape), p, seed + i)).mul_(1.0 / (1.0 - p) / total)
            torch.bmm(probs, vf[s:e], out=out[s:e])  # (g, T, hs)
        ctx.save_for_backward(qf, kf, vf, out, lse, future)
        ctx.p, ctx.seed, ctx.rows, ctx.scale, ctx.shape = p, seed, rows, scale, q.shape
        return out.view(B, nh, T, hs).to(ctx.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qf, kf, vf, out, lse, future = ctx.saved_tensors
        G, T, hs = qf.shape
        dout = grad_out.float().reshape(G, T, hs)
        delta = (dout * out).sum(dim=-1, keepdim=True)  # (G, T, 1): rowsum(dP * P)
        dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
        inv_keep = 1.0 / (1.0 - ctx.p)
        for i, s in enumerate(range(0, G, ctx.rows)):
            e = min(s + ctx.rows, G)
            probs = _probs(qf[s:e], kf[s:e], future, ctx.scale).sub_(lse[s:e]).exp_()
            kept = keep_mask(tuple(probs.shape), ctx.p, ctx.seed + i).float().mul_(inv_keep)
            torch.bmm((probs * kept).transpose(1, 2), dout[s:e], out=dv[s:e])  # (g, T, hs)
            dprobs = torch.bmm(dout[s:e], vf[s:e].transpose(1, 2)).mul_(kept)  # (g, T, T)
            dscores = dprobs.sub_(delta[s:e]).mul_(probs).mul_(ctx.scale)
            torch.bmm(dscores, kf[s:e], out=dq[s:e])
            torch.bmm(dscores.transpose(1, 2), qf[s:e], out=dk[s:e])
        shape, dtype = ctx.shape, ctx.dtype
        return dq.view(shape).to(dtype), dk.view(shape).to(dtype), dv.view(shape).to(dtype), None


def _probs(q: torch.Tensor, k: torch.Tensor, future: torch.Tensor, scale: float
           ) -> torch.Tensor:
    """Scaled causal scores (g, T, T) for q, k (g, T, hs), the future set to -inf."""
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    return scores.masked_fill_(future, float("-inf"))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float
                     ) -> torch.Tensor:
    """Causal self-attention of q, k, v (B, nh, T, hs) with attention dropout p."""
    if p == 0.0 or q.device.type != "cpu" or torch.compiler.is_compiling():
        return nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    return _CausalDropoutAttention.apply(q, k, v, p)


def use_fast_dropout(model: nn.Module, on: bool = True) -> None:
    """Switch `model`'s dropout layers and attention dropout to (or back from) these masks."""
    for module in list(model.modules()):
        if hasattr(module, "fast_dropout"):
            module.fast_dropout = on
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout) and (type(child) is FastDropout) != on:
                swapped = (FastDropout if on else nn.Dropout)(child.p)
                setattr(module, name, swapped.train(child.training))
