"""Dropout for CPU training that is cheap to draw and cheap to keep.

PyTorch's CPU dropout draws one Bernoulli sample per element (~10 ns each) and its fused
attention kernels refuse dropout, so attention with dropout falls back to the math path that
keeps several (B, nh, T, T) tensors per layer for backward. Here keep-masks come from 16-bit
slices of 64-bit random words (P(drop) = round(p * 65536) / 65536) seeded from torch's
generator, so `torch.manual_seed` and resume replay them; attention keeps no masks at all: it
regenerates them from their seed and recomputes its probabilities in backward, tile by tile,
as flash attention does.
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
    """softmax(q k^T / sqrt(hs) + causal) with dropout, times v, keeping O(T) per query; with
    a bool mask (B, 1, T, T) (packed documents), only where it is True as well.

    Work goes in tiles of (g sequences x QUERY_BLOCK queries x the keys they may see), so the
    future half of the scores is never computed and each tile's scores stay in cache. Matmuls
    run in the inputs' dtype (bf16 under autocast), softmax and accumulation in float32.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, nh, T, hs = q.shape
        qf, kf, vf = (t.reshape(B * nh, T, hs) for t in (q, k, v))  # (G, T, hs)
        tiles = _tiles(B * nh, T)
        seed, scale = _seed(), 1.0 / math.sqrt(hs)
        out = torch.empty_like(qf)  # (G, T, hs)
        lse = torch.empty(B * nh, T, 1, dtype=torch.float32, device=q.device)
        for n, (g, t) in enumerate(tiles):
            probs = _scores(qf, kf, g, t, scale, mask)  # (g, tq, tk)
            top = probs.amax(dim=-1, keepdim=True)  # (g, tq, 1)
            total = probs.sub_(top).exp_().sum(dim=-1, keepdim=True)
            lse[g, t] = top + total.log()
            probs.mul_(keep_mask(tuple(probs.shape), p, seed + n)).mul_(1 / (1 - p) / total)
            out[g, t] = torch.bmm(probs.to(vf.dtype), vf[g, :t.stop])  # (g, tq, hs)
        ctx.save_for_backward(qf, kf, vf, out, lse, mask)
        ctx.p, ctx.seed, ctx.scale, ctx.tiles = p, seed, scale, tiles
        return out.view(B, nh, T, hs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qf, kf, vf, out, lse, mask = ctx.saved_tensors
        dout = grad_out.reshape(qf.shape).to(qf.dtype)  # (G, T, hs)
        delta = (dout.float() * out.float()).sum(dim=-1, keepdim=True)  # (G, T, 1)
        dq = torch.empty_like(qf)
        dk = torch.zeros(kf.shape, dtype=torch.float32, device=kf.device)  # summed over tiles
        dv = torch.zeros(vf.shape, dtype=torch.float32, device=vf.device)
        low = qf.dtype
        for n, (g, t) in enumerate(ctx.tiles):
            keys = slice(0, t.stop)
            probs = _scores(qf, kf, g, t, ctx.scale, mask).sub_(lse[g, t]).exp_()  # (g, tq, tk)
            kept = keep_mask(tuple(probs.shape), ctx.p, ctx.seed + n).float()
            kept.mul_(1 / (1 - ctx.p))
            dv[g, keys] += torch.bmm((probs * kept).transpose(1, 2).to(low), dout[g, t])
            dprobs = torch.bmm(dout[g, t], vf[g, keys].transpose(1, 2)).float().mul_(kept)
            dscores = dprobs.sub_(delta[g, t]).mul_(probs).mul_(ctx.scale).to(low)
            dq[g, t] = torch.bmm(dscores, kf[g, keys])  # (g, tq, hs)
            dk[g, keys] += torch.bmm(dscores.transpose(1, 2), qf[g, t])
        shape = grad_out.shape
        return dq.view(shape), dk.to(low).view(shape), dv.to(low).view(shape), None, None


QUERY_BLOCK = 64  # queries per tile: the causal mask then skips (1 - (n+1)/2n) of the scores


def _tiles(G: int, T: int) -> list[tuple[slice, slice]]:
    """(sequences, queries) tiles; the queries of a tile see keys 0 .. queries.stop."""
    tq = min(T, QUERY_BLOCK)
    g = max(1, CHUNK_BYTES // (4 * tq * T))
    return [(slice(s, min(s + g, G)), slice(i, min(i + tq, T)))
            for s in range(0, G, g) for i in range(0, T, tq)]


def _scores(q: torch.Tensor, k: torch.Tensor, g: slice, t: slice, scale: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 scaled scores (g, tq, tk) of queries t against keys 0..t.stop, future -inf;
    and where the bool `mask` (B, 1, T, T) of the g sequences' rows is False."""
    scores = torch.bmm(q[g, t], k[g, :t.stop].transpose(1, 2)).float().mul_(scale)
    future = torch.ones(t.stop - t.start, t.stop, dtype=torch.bool, device=q.device)
    scores.masked_fill_(future.triu_(t.start + 1), float("-inf"))
    if mask is not None:  # sequence s of the G = B * nh is row s // nh's head s % nh
        heads = q.size(0) // mask.size(0)
        rows = torch.arange(g.start, g.stop, device=q.device) // heads  # (g,)
        scores.masked_fill_(~mask[rows, 0, t, :t.stop], float("-inf"))
    return scores


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal self-attention of q, k, v (B, nh, T, hs) with attention dropout p; with `mask`
    (B, 1, T, T) bool, a query sees only the keys it marks True (itself always among them)."""
    if p == 0.0 or q.device.type != "cpu" or torch.compiler.is_compiling():
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                          is_causal=mask is None)
    return _CausalDropoutAttention.apply(q, k, v, p, mask)
