"""A copy of a model for decoding on a CPU: no dropout, a float32 KV cache, an output head laid
out for a few rows, and, where it gains, linear layers with weights pre-packed for oneDNN.

Decoding multiplies one token's activations by every weight matrix: a matrix-vector product
bound by how fast the weights stream from memory. `F.linear` reads the (out, in) layout as it
is; oneDNN's blocked layout, packed once, streams faster (on a Zen 5, a 1536 x 384 float32
weight: 160 -> 63 us; bfloat16: 55 -> 27 us). Each call also costs ~10 us of fixed overhead,
so small matrices stay as they are. These are the kernels inductor uses for frozen CPU
weights (`torch.ops.mkldnn._linear_pointwise`); whether a model gains is measured
(decoding.py). The output head, given several rows at once (the server's batched steps),
uses a second packing laid out for ROWS_HINT rows and made on first use: for a 50k
vocabulary, one row's packing and MKL's matmul of 8 rows ran 1.6-2x slower than it (AMD
EPYC, AVX2, one thread: 50,257 x 128 head, 8 rows: 3.7 ms against 6.0-7.7). Only the head:
the blocks' layers also see a prefill's many rows, and a second packing of every layer
would double a packed model's memory. A decoding copy is for inference only: no gradients,
no dropout, and its packed weights are not in its state_dict.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from folio.model.gpt import GPT

MIN_PACKED_ELEMENTS = 1 << 16  # smaller weights lose more to the call's overhead than they gain
ROWS_HINT = 8  # the rows a weight is packed for when a call has several (batched decoding)
# A head packed for rows gains from about this size (8 rows, AVX2 Zen 3: 50,257 x 128: 1.2
# against 3.8 ms; 3,072 x 128: 99 against 112 us; 2,048 x 128: 91 against 86 us), and costs a
# small one ~50 us of the call's overhead (65 x 128, the char model: 56 against 9 us)
MIN_ROWS_PACKED_ELEMENTS = 1 << 18


def worth_packing(module: nn.Module) -> bool:
    """Whether `module` is a linear layer large enough to gain from packing."""
    return isinstance(module, nn.Linear) and module.weight.numel() >= MIN_PACKED_ELEMENTS


def can_pack(model: GPT) -> bool:
    """Whether `model` has a linear layer worth packing, on a CPU and torch build that can."""
    weight = model.lm_head.weight
    return (packs(weight) and weight.dtype in (torch.float32, torch.bfloat16)
            and any(worth_packing(m) for m in model.modules()))


def packs(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack `weight` here (a CPU tensor, a torch build with oneDNN)."""
    return (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class RowsPacking:
    """A weight (out, in) packed for oneDNN for ROWS_HINT rows, made on first use."""

    def __init__(self) -> None:
        self.packed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                 ) -> torch.Tensor:
        """x (N, in) @ weight^T + bias -> (N, out)."""
        if self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ROWS_HINT)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """`linear`'s y = x W^T + b with W (out, in) reordered for oneDNN; x (..., in)."""

    def __init__(self, linear: nn.Linear, rows: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # plain attributes, not buffers: the packed layout is not a checkpoint format; the
        # layout is tuned for one row at a time (batch size hint 1); with `rows`, another
        # for several (the output head of batched steps)
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.rows = RowsPacking() if rows else None
        self.weight = weight if rows else None  # kept only to pack it for rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        if rows.size(0) > 1 and self.rows is not None:
            y = self.rows(rows, self.weight, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)


class DecodingHead(nn.Module):
    """The output head for a few rows at a time: x (..., C) -> logits (..., V) of the real
    vocabulary, in float32 on a CPU. A few rows times a contiguous (C, V) copy is 2-3x faster
    than F.linear's (V, C) layout for a 50k vocabulary, and float32 5x faster than bfloat16
    for a small one. A copy of the weights: they must not change while it is in use."""

    def __init__(self, weight: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.head = weight.detach()[:vocab_size].t().float().contiguous()  # (C, V)
        self.rows = (RowsPacking() if packs(self.head)  # for several rows at once
                     and self.head.numel() >= MIN_ROWS_PACKED_ELEMENTS else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.head.size(0)).float()  # (N, C)
        if rows.size(0) > 1 and self.rows is not None:
            return self.rows(rows, self.head.t(), None).view(*x.shape[:-1], -1)  # (..., V)
        return x.float() @ self.head  # (..., V)


def decoding_copy(model: GPT, pack: bool) -> GPT:
    """A copy of `model` for decoding: without dropout layers (no-ops in eval mode, but each
    call costs a few microseconds: ~9% of a decoding step of the 6 x 384 char model), with
    float32 KV caches (a CPU's attention kernels are 3-5x faster than bfloat16's), the output
    head as a `DecodingHead` and, with `pack`, its large linear layers (blocks and output
    head) packed. Embeddings, norms, attention and unpacked layers are shared with `model`,
    not copied."""
    head, pack = model.lm_head, pack and can_pack(model)
    twin = _for_decoding(model, pack, skip=head)
    real = nn.Linear(head.in_features, model.config.vocab_size, bias=False, device="meta")
    real.weight = nn.Parameter(head.weight.detach()[:model.config.vocab_size],
                               requires_grad=False)
    twin.lm_head = (PackedLinear(real, rows=True) if pack and worth_packing(real)
                    else DecodingHead(head.weight, model.config.vocab_size))
    twin.cache_dtype = torch.float32
    return twin


def _for_decoding(module: nn.Module, pack: bool, skip: nn.Module) -> nn.Module:
    """A shallow copy of `module`, its dropout layers replaced by nn.Identity and, with
    `pack`, each large nn.Linear under it but `skip` packed."""
    if module is skip:
        return module
    if isinstance(module, nn.Dropout):
        return nn.Identity()
    if isinstance(module, nn.Linear):
        return PackedLinear(module) if pack and worth_packing(module) else module
    twin = copy.copy(module)
    twin._modules = {name: _for_decoding(child, pack, skip)
                     for name, child in module._modules.items()}
    return twin
