"""Linear + cross-entropy for a large vocabulary: row blocks, one fused softmax per logit.

nanoGPT's path writes float32 (N, V) logits, runs log-softmax over them, and in backward fills
a one-hot (N, V) gradient, runs log-softmax's backward and casts the result for the matmuls:
six passes over the largest tensor of a small GPT, most of a step for a 50k vocabulary on a
CPU. Here a block of rows computes its logits in the matmul dtype (bfloat16 under autocast),
cache-sized chunks of them go once through the fused float32 softmax kernel, which gives the
loss and d loss / d logits = softmax - onehot, written over the logits; the block's gradients
wrt the hidden states and the head weight follow while it is at hand. Backward only scales
the saved gradients. Memory: one block of logits in the matmul dtype, never (N, V) float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_BYTES = 64 << 20  # one block's logits in the matmul dtype (50,304 tokens, bf16: 667 rows)
SOFTMAX_BYTES = 4 << 20  # one chunk's float32 softmax, in cache (50,304 tokens: 20 rows); 2-4 MB
# were fastest on a Zen 5 (256 KB: 1.6x slower, each chunk costs ~90 us of op dispatch)
TINY = 1e-30  # a target probability below this has lost precision: its row is done exactly
IGNORE_INDEX = -1  # targets equal to this do not count (nanoGPT's convention)


def block_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per block so one block's logits in `dtype` take about BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // (dtype.itemsize * vocab))


def _log_probs(p: torch.Tensor, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
               vocab: int) -> torch.Tensor:
    """log softmax (N, 1) at the targets y (N, 1) from their probabilities p (N, 1); the rare
    rows whose probability underflowed are redone exactly from h (N, C) and the first `vocab`
    rows of w (V_padded, C)."""
    tiny = (p < TINY).squeeze(1).nonzero().squeeze(1)  # (k,)
    log_p = p.log()
    if tiny.numel():
        logits = (h[tiny] @ w[:vocab].t()).float()  # (k, V)
        log_p[tiny] = logits.gather(1, y[tiny]) - torch.logsumexp(logits, 1, keepdim=True)
    return log_p


def _blocked_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
                  rows: int, grads: bool, vocab: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss over the first `vocab` rows of w (V_padded, C) and, if `grads`, its gradients
    wrt h (N, C) and w (zero in the padding rows), block by block.

    Matmuls run in `dtype` over all V_padded rows (a multiple of 64: 50,257 rows were 1.2x
    slower than 50,304), the softmax in float32 with the padding columns at -inf, so they are
    no tokens and get no gradient. Buffers are allocated once and reused: fresh large
    allocations cost page faults that, on a CPU, can take longer than the math.
    """
    N, V = h.size(0), w.size(0)
    rows = min(rows, N)
    step = min(rows, max(1, SOFTMAX_BYTES // (4 * V)))  # rows per softmax chunk
    valid = y != IGNORE_INDEX
    safe_y = y.masked_fill(~valid, 0)[:, None]  # (N, 1)
    weight = (valid / valid.sum().clamp(min=1))[:, None]  # (N, 1) each row's share of the mean
    hc, wc = h.to(dtype), w.to(dtype)
    # Each row's weight goes into the (N, C) side of the gradient matmuls, not over (N, V)
    weighted_ht = (h * weight).t().to(dtype).contiguous() if grads else None  # (C, N)
    p = torch.empty(N, 1, device=h.device)  # softmax at each row's target
    minus_one = torch.full((step, 1), -1.0, device=h.device)
    grad_h = torch.empty(N, h.size(1), dtype=dtype, device=h.device) if grads else None
    grad_w = None
    block_buf = torch.empty(rows, V, dtype=dtype, device=h.device)
    wide = torch.empty(step, V, device=h.device) if dtype != torch.float32 else None
    probs_buf = torch.empty(step, V, device=h.device)
    for s in range(0, N, rows):
        e = min(s + rows, N)
        block = torch.mm(hc[s:e], wc.t(), out=block_buf[:e - s])  # (n, V) logits
        for a in range(0, e - s, step):
            b = min(a + step, e - s)
            chunk, target = block[a:b], safe_y[s + a:s + b]  # (k, V), (k, 1)
            logits = chunk if wide is None else wide[:b - a].copy_(chunk)  # float32
            if vocab < V:  # the padding columns are no tokens
                logits[:, vocab:].fill_(float("-inf"))
            probs = torch.ops.aten._softmax.out(logits, 1, False, out=probs_buf[:b - a])
            torch.gather(probs, 1, target, out=p[s + a:s + b])
            if grads:  # d loss / d logits = softmax - onehot (before weighting), over the logits
                chunk.copy_(probs.scatter_add_(1, target, minus_one[:b - a]))
        if not grads:
            continue
        torch.mm(block, wc, out=grad_h[s:e])  # (n, C), weighted below
        # (C, n) @ (n, V) with a contiguous left operand: 1.3x faster than block.t() @ h
        part = torch.mm(weighted_ht[:, s:e], block).t()  # (V, C)
        if grad_w is None:  # float32, laid out as w (the optimizer would copy it otherwise)
            grad_w = torch.empty(part.shape, device=h.device).copy_(part)
        else:
            grad_w.add_(part)
    if grads:
        grad_h = grad_h.float().mul_(weight)
    return -(_log_probs(p, hc, wc, safe_y, vocab) * weight).sum(), grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ w.T) against y; gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
                rows: int, vocab: int) -> torch.Tensor:
        loss, grad_h, grad_w = _blocked_loss(h, w, y, dtype, rows, True, vocab)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors  # (N, C), (V, C)
        # Scaled in place: no second (V, C) buffer, and no host sync to test for a 1.0. The
        # saved tensors are this graph's own; a second backward through it (retain_graph)
        # is refused by autograd's in-place check rather than scaling them twice.
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), None, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                               vocab: int | None = None, dtype: torch.dtype | None = None,
                               rows: int | None = None) -> torch.Tensor:
    """F.cross_entropy(h @ w[:vocab].T, y, ignore_index=-1) for h (N, C), w (V_padded, C),
    y (N,): the rows of w past `vocab` (default: all of them) pad the table and are no tokens.

    `dtype` is the matmul dtype (default: the autocast dtype when autocast is on, else h's);
    `rows` the rows per block (default: block_rows). Gradients reach h and w; with no
    gradient needed only the loss is computed.
    """
    vocab = vocab or w.size(0)
    if torch.compiler.is_compiling():  # the compiler fuses the plain form itself
        return F.cross_entropy(F.linear(h, w[:vocab]).float(), y, ignore_index=IGNORE_INDEX)
    if dtype is None:
        device_type = h.device.type
        dtype = (torch.get_autocast_dtype(device_type)
                 if torch.is_autocast_enabled(device_type) else h.dtype)
    rows = rows or block_rows(w.size(0), dtype)
    with torch.autocast(h.device.type, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            return _FusedLinearCrossEntropy.apply(h.float(), w, y, dtype, rows, vocab)
        return _blocked_loss(h, w, y, dtype, rows, False, vocab)[0]
