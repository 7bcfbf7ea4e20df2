"""The training kernels: faster modules with the plain model's math, swapped in place.

A plain `GPT` computes with nn.Dropout, `CausalAttention` (SDPA) and `CrossEntropy` (full
logits). On a CPU each has a faster twin with the same results (up to float rounding and which
dropout masks are drawn): `FastDropout` (fastdropout.py), `CpuAttention` below and
`FusedCrossEntropy` (fastloss.py). `apply` swaps them in; parameters and state_dict keys are
untouched, so a checkpoint never depends on the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from folio.model.gpt import GPT, CausalAttention, CrossEntropy
from folio.speed.fastdropout import FastDropout, causal_attention
from folio.speed.fastloss import fused_linear_cross_entropy


@dataclass(frozen=True)
class Kernels:
    """Which fast modules a model computes with; not part of its shape or its checkpoint."""

    fused_loss: bool = False  # training loss without the (B*T, V) logits (fastloss.py)
    fast_dropout: bool = False  # CPU dropout masks cheap to draw and keep (fastdropout.py)
    # SDPA in float32 under bfloat16 autocast: a CPU's bfloat16 SDPA backward took 3.7x
    # float32's for the README CPU model (Zen 5), more than its bfloat16 matmuls saved (the
    # fast-dropout attention, made of matmul tiles, stays in bfloat16: it gains there)
    float32_attention: bool = False

    @classmethod
    def for_device(cls, device_type: str) -> Kernels:
        """What training uses on a device: all on a CPU (far less memory, faster), none
        elsewhere (the GPU kernels and torch.compile do better)."""
        on = device_type == "cpu"
        return cls(fused_loss=on, fast_dropout=on, float32_attention=on)


PLAIN = Kernels()  # the model's own math, as built


class CpuAttention(CausalAttention):
    """`CausalAttention` with the CPU's faster kernels: attention dropout in tiles that keep
    no (T, T) dropout masks (fastdropout.py; packed documents' bool mask too), and SDPA in
    float32 under bfloat16 autocast."""

    def __init__(self, dropout: float, fast_dropout: bool, float32: bool):
        super().__init__(dropout)
        self.fast_dropout, self.float32 = fast_dropout, float32

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        documents = mask is not None and mask.dtype == torch.bool  # (B, 1, T, T), no cache
        if dropout and self.fast_dropout and (mask is None or documents) \
                and q.size(2) == k.size(2):
            return causal_attention(q, k, v, dropout, mask)  # training; tiles of matmuls
        if self.float32 and q.dtype != torch.float32:
            with torch.autocast(q.device.type, enabled=False):
                if mask is not None and not documents:  # an additive mask in SDPA's dtype
                    mask = mask.float()
                return super().forward(q.float(), k.float(), v.float(), mask).to(q.dtype)
        return super().forward(q, k, v, mask)


class FusedCrossEntropy(CrossEntropy):
    """`CrossEntropy` that never holds the (N, V) logits (fastloss.py); without a soft-cap."""

    def forward(self, x: torch.Tensor, head: torch.Tensor, targets: torch.Tensor
                ) -> torch.Tensor:
        if self.softcap:
            return super().forward(x, head, targets)
        return fused_linear_cross_entropy(x, head, targets, self.vocab_size)


def apply(model: GPT, kernels: Kernels) -> GPT:
    """Swap `model`'s dropout, attention and loss modules for the ones `kernels` chooses (the
    plain ones where a kernel is off), in place; returns `model`."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            swapped = _swap(child, kernels)
            if swapped is not child:
                swapped.train(child.training)
                setattr(module, name, swapped)
    return model


def _swap(module: nn.Module, kernels: Kernels) -> nn.Module:
    if isinstance(module, nn.Dropout):
        return (FastDropout if kernels.fast_dropout else nn.Dropout)(module.p)
    if isinstance(module, CausalAttention):
        if kernels.fast_dropout or kernels.float32_attention:
            return CpuAttention(module.dropout, kernels.fast_dropout, kernels.float32_attention)
        return CausalAttention(module.dropout)
    if isinstance(module, CrossEntropy):
        kind = FusedCrossEntropy if kernels.fused_loss else CrossEntropy
        return kind(module.vocab_size, module.softcap)
    return module


def kernels_of(model: GPT) -> Kernels:
    """The kernels `model` computes with now."""
    attention = next(m for m in model.modules() if isinstance(m, CausalAttention))
    return Kernels(fused_loss=isinstance(model.loss, FusedCrossEntropy),
                   fast_dropout=getattr(attention, "fast_dropout", False),
                   float32_attention=getattr(attention, "float32", False))
