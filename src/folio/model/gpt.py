"""The GPT-2 architecture: embeddings, pre-LayerNorm blocks, tied output head.

Parameter names match nanoGPT (and so, after a transpose, Hugging Face GPT-2). No device,
dtype or distributed code lives here; inference-time caching lives in sample.py.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from folio.model.fastdropout import causal_attention
from folio.model.fastloss import fused_linear_cross_entropy
from folio.model.noinit import no_init

VOCAB_MULTIPLE = 64  # the embedding table is padded to a multiple of this for fast matmuls


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the position table covers
    vocab_size: int = 50257  # real tokens; the table is padded, see padded_vocab_size
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # Attention dropout that keeps no (B, nh, T, T) tensors (fastdropout.py); off: SDPA.
        self.fast_dropout = False

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project to queries, keys and values, each (B, nh, T, hs)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        shape = (B, T, self.n_head, C // self.n_head)
        return (q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2),
                v.view(shape).transpose(1, 2))

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """Merge heads (B, nh, T, hs) -> (B, T, C) and apply the output projection."""
        B, nh, T, hs = y.shape
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)  # (B, nh, T, hs)
        dropout = self.dropout if self.training else 0.0
        if dropout and self.fast_dropout:
            y = causal_attention(q, k, v, dropout)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.project(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        # Training loss without the (B*T, V) logits (fastloss.py); off: nanoGPT's plain path.
        self.fused_loss = False
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the stream's variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position table is not counted as 'non-embedding' (as nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token + position embeddings for idx (B, T) at positions start..start+T -> (B, T, C)."""
        T = idx.size(1)
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) for token ids idx (B, T)."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        x = self.embed(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V_padded) and, given targets (B, T), the mean cross-entropy loss.

        Without targets only the last position's logits are computed, (B, 1, V_padded).
        With `fused_loss` set, targets give (None, loss): the logits are never materialised.
        """
        x = self.hidden(idx)  # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        if self.fused_loss:
            loss = fused_linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight,
                                              targets.reshape(-1))  # (B*T, C) x (V, C) -> ()
            return None, loss
        logits = self.lm_head(x)  # (B, T, V_padded)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (e.g. a 1024-token GPT-2 finetuned at 256 tokens)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B."""
        cfg = self.config
        n = self.num_params()
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len


@functools.lru_cache(maxsize=16)
def count_params(shape_json: str) -> int | None:
    """Non-embedding parameter count (as nanoGPT prints it) of a run.json model section given
    as JSON, from the model built on the meta device (no memory, no compute); None if unknown."""
    try:
        with torch.device("meta"), no_init():
            return GPT(GPTConfig(**json.loads(shape_json))).num_params()
    except Exception:  # an unknown/old model dict: callers just leave the count out
        return None
