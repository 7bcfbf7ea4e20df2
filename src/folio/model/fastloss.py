"""Linear + cross-entropy in row chunks, never holding the full (N, V) logits or their gradient.

For a large vocabulary the output head dominates a small GPT: nanoGPT's path writes a float32
(N, V) logits tensor, runs log-softmax over it and writes an equally large gradient. Here each
chunk of rows computes its logits, loss and gradients (wrt the hidden states and the head
weight) while the chunk is still in cache; backward only scales the saved gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 16 << 20  # float32 logits per chunk: big enough for efficient matmuls, small
# enough that the (N, V) logits never exist at once (50,304-token vocabulary: 80 rows)
IGNORE_INDEX = -1  # targets equal to this do not count (nanoGPT's convention)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk so one chunk's float32 logits take about CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def _chunked_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
                  rows: int, grads: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss and, if `grads`, its gradients wrt h (N, C) and w (V, C), chunk by chunk.

    Matmuls run in `dtype`, softmax and sums in float32. Every per-chunk buffer is allocated
    once and reused: fresh large allocations cost page faults that, on a CPU, can take longer
    than the arithmetic.
    """
    N, V = h.size(0), w.size(0)
    rows = min(rows, N)
    hc, wc = h.to(dtype), w.to(dtype)
    valid = y != IGNORE_INDEX  # (N,)
    safe_y = y.masked_fill(~valid, 0)[:, None]  # (N, 1)
    weight = valid / valid.sum().clamp(min=1)  # (N,) each row's share of the mean
    row_loss = torch.empty(N, dtype=torch.float32, device=h.device)
    grad_h = torch.empty(N, h.size(1), dtype=dtype, device=h.device) if grads else None
    grad_w = torch.zeros_like(w, dtype=torch.float32) if grads else None  # (V, C)
    probs = torch.empty(rows, V, dtype=torch.float32, device=h.device)
    low = torch.empty(rows, V, dtype=dtype, device=h.device) if dtype != torch.float32 else None
    part_w = torch.empty_like(wc) if grads and low is not None else None  # (V, C) per chunk
    for s in range(0, N, rows):
        e = min(s + rows, N)
        n, h_chunk = e - s, hc[s:e]
        p = probs[:n]  # (n, V)
        if low is None:
            torch.mm(h_chunk, wc.t(), out=p)
        else:
            p.copy_(torch.mm(h_chunk, wc.t(), out=low[:n]))
        target = p.gather(1, safe_y[s:e]).squeeze(1)  # (n,)
        top = p.amax(dim=1, keepdim=True)  # (n, 1)
        total = p.sub_(top).exp_().sum(dim=1, keepdim=True)  # (n, 1), one exp per logit
        row_loss[s:e] = (top + total.log()).squeeze(1) - target
        if not grads:
            continue
        # d loss / d logits = (softmax - onehot) * weight
        p.mul_(weight[s:e, None] / total)
        p.scatter_add_(1, safe_y[s:e], -weight[s:e, None])
        g = p if low is None else low[:n].copy_(p)  # (n, V) in the matmul dtype
        torch.mm(g, wc, out=grad_h[s:e])  # (n, C)
        if part_w is None:
            grad_w.addmm_(g.t(), h_chunk)  # (V, C), float32 accumulation over chunks
        else:
            grad_w += torch.mm(g.t(), h_chunk, out=part_w)
    return (row_loss * weight).sum(), grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ w.T) against y; gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
                rows: int) -> torch.Tensor:
        loss, grad_h, grad_w = _chunked_loss(h, w, y, dtype, rows, grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors  # (N, C), (V, C)
        # Scaled in place: no second (V, C) buffer, and no host sync to test for a 1.0. The
        # saved tensors are this graph's own; a second backward through it (retain_graph)
        # is refused by autograd's in-place check rather than scaling them twice.
        return grad_h.float().mul_(grad_out), grad_w.mul_(grad_out), None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                               dtype: torch.dtype | None = None, rows: int | None = None
                               ) -> torch.Tensor:
    """F.cross_entropy(h @ w.T, y, ignore_index=-1) for h (N, C), w (V, C), y (N,).

    `dtype` is the matmul dtype (default: the autocast dtype when autocast is on, else h's).
    Gradients reach h and w; with no gradient needed only the loss is computed.
    """
    if torch.compiler.is_compiling():  # the compiler fuses the plain form itself
        return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=IGNORE_INDEX)
    if dtype is None:
        device_type = h.device.type
        dtype = (torch.get_autocast_dtype(device_type)
                 if torch.is_autocast_enabled(device_type) else h.dtype)
    rows = rows or chunk_rows(w.size(0))
    with torch.autocast(h.device.type, enabled=False):
        if h.size(0) <= rows:  # one chunk holds all the logits: plain math has fewer steps
            logits = h.to(dtype) @ w.to(dtype).t()  # (N, V)
            return F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            return _FusedLinearCrossEntropy.apply(h.float(), w, y, dtype, rows)
        return _chunked_loss(h, w, y, dtype, rows, grads=False)[0]
