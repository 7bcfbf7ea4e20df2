"""The GPT-2 architecture (embeddings, pre-LayerNorm blocks, tied output head), with the
modern small-GPT options as config fields (rotary positions, RMSNorm, QK-norm, ReLU², untied
head, logit soft-cap, zero-initialised output projections) and those of the small models people
finetune (Llama, SmolLM2, Qwen3: learned RMSNorm scales, SwiGLU, grouped-query attention,
another rotary base or head width); the defaults are GPT-2's.

One forward pass serves training, evaluation, prefill and cached decoding: `GPT.forward`
takes an optional KV cache (cache.py) that the attention layers write into and read from, or
(a chat run's packed conversations) the token that opens each document: attention then stays
within a document and positions restart at each (`documents`).
Parameter names match nanoGPT (and so, after a transpose, Hugging Face GPT-2). The model is
plain PyTorch math with no device, dtype or distributed code: folio.speed swaps its
parameter-free pieces (dropout, `CausalAttention`, `CrossEntropy`) for faster kernels of the
same math, and machine.distributed wraps it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from folio.model.cache import KVCache, RowCache, positions

VOCAB_MULTIPLE = 64  # the embedding table is padded to a multiple of this for fast matmuls
ROPE_BASE = 10000.0  # the rotary base of folio's own models


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the position table covers
    vocab_size: int = 50257  # real tokens; the table is padded, see padded_vocab_size
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has
    # The modern options; each default is GPT-2's, so an older run.json (without them) loads.
    rope: bool = False  # rotary position embeddings on q and k instead of a position table
    norm: str = "layernorm"  # layernorm | rmsnorm (parameter-free)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    mlp: str = "gelu"  # gelu | relu2 (ReLU squared)
    tie_head: bool = True  # the output head shares the token embedding's weights
    logit_softcap: float = 0.0  # logits -> cap * tanh(logits / cap); 0 leaves them as they are
    zero_init_proj: bool = False  # output projections (attention and MLP) start at zero
    # The shapes of imported models (store/hf_import.py); each default keeps the model above.
    n_kv_head: int = 0  # key/value heads, each shared by n_head / n_kv_head queries; 0: n_head
    head_dim: int = 0  # width of one head; 0: n_embd // n_head
    mlp_hidden: int = 0  # the MLP's hidden width; 0: 4 * n_embd
    norm_weight: bool = False  # rmsnorm (and qk_norm) with a learned scale per channel
    norm_eps: float = 0.0  # 0: LayerNorm's 1e-5, RMSNorm's float32 machine epsilon
    rope_theta: float = ROPE_BASE  # the rotary base
    rope_scaling: dict | None = None  # {"rope_type": "llama3", ...} (Llama 3, Apertus); None

    def __post_init__(self) -> None:
        if self.norm not in NORMS or self.mlp not in ACTIVATIONS:
            raise ValueError(f"norm={self.norm!r} / mlp={self.mlp!r}: expected norm in "
                             f"{sorted(NORMS)} and mlp in {sorted(ACTIVATIONS)}")
        if self.n_head % self.kv_heads or (not self.head_dim and self.n_embd % self.n_head):
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head="
                             f"{self.kv_heads} and, without head_dim, divide n_embd="
                             f"{self.n_embd}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") != "llama3":
            raise ValueError(f"rope_scaling={self.rope_scaling!r}: only rope_type 'llama3' "
                             "is implemented")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    def to_dict(self) -> dict:
        """The fields; those of imported models (IMPORTED_SHAPE) only where set, so a folio
        run's run.json and autotune keys read as they did before those options existed."""
        defaults = {f.name: f.default for f in fields(self)}
        return {k: v for k, v in asdict(self).items()
                if k not in IMPORTED_SHAPE or v != defaults[k]}


# The fields only imported models set (no training setting names them; a checkpoint does).
IMPORTED_SHAPE = ("n_kv_head", "head_dim", "mlp_hidden", "norm_weight", "norm_eps",
                  "rope_theta", "rope_scaling")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: parameter-free (nanochat, modded-nanogpt), or with a
    learned scale (ndim,) as Llama has. eps None: float32's machine epsilon (F.rms_norm's)."""

    def __init__(self, ndim: int = 0, weight: bool = False, eps: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim)) if weight else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rms_norm(config: GPTConfig, ndim: int) -> RMSNorm:
    return RMSNorm(ndim, config.norm_weight, config.norm_eps or None)


NORMS = {"layernorm": lambda config: LayerNorm(config.n_embd, config.bias,
                                               config.norm_eps or 1e-5),
         "rmsnorm": lambda config: rms_norm(config, config.n_embd)}


class ReLU2(nn.Module):
    """relu(x)^2: the speedrun's MLP activation (sparse, cheap, trains faster than GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class XIELU(nn.Module):
    """xIELU (arXiv 2411.13010), Apertus' activation: alpha_p·x² + beta·x for x > 0, else
    alpha_n·(expm1(min(x, eps)) - x) + beta·x, with alpha_p = softplus(a_p) and alpha_n =
    beta + softplus(a_n) learned per layer (a_p, a_n stored raw, as transformers does)."""

    BETA, EPS = 0.5, -1e-6

    def __init__(self, alpha_p: float = 0.8, alpha_n: float = 0.8):
        super().__init__()
        raw = torch.tensor([alpha_p, alpha_n - self.BETA]).expm1().log()  # softplus⁻¹
        self.alpha_p = nn.Parameter(raw[:1].clone())  # (1,)
        self.alpha_n = nn.Parameter(raw[1:].clone())  # (1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.BETA + F.softplus(self.alpha_n)
        negative = (torch.expm1(x.clamp(max=self.EPS)) - x) * alpha_n
        return torch.where(x > 0, alpha_p * x * x, negative) + self.BETA * x


# mlp -> the activation; the gated ones (swiglu: silu(gate) * up) have two input projections
ACTIVATIONS = {"gelu": nn.GELU, "relu2": ReLU2, "swiglu": nn.SiLU, "xielu": XIELU}
GATED = frozenset({"swiglu"})


def norm_layer(config: GPTConfig) -> nn.Module:
    return NORMS[config.norm](config)


def rotary(pos: torch.Tensor, head_size: int, base: float = ROPE_BASE,
           scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, hs/2) of rotary embeddings at positions pos (T,), or (B, T, hs/2) at
    each row's own positions (B, T). Computed from the positions alone, so a token's rotation
    is the same in a full pass and a cached one."""
    inv_freq = base ** -(torch.arange(0, head_size, 2, device=pos.device,
                                      dtype=torch.float32) / head_size)  # (hs/2,)
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    angles = pos.float()[..., None] * inv_freq  # (..., T, hs/2)
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3's long-context rotary frequencies: wavelengths beyond the original context
    divided by `factor`, short ones kept, those between blended smoothly."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq  # (hs/2,)
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hs/2}) of x (B, nh, T, hs) by their position's angles."""
    cos, sin = (t.to(x.dtype) for t in rope)  # (T, hs/2) or (B, T, hs/2)
    if cos.dim() == 3:  # each row at its own positions: the same angles for every head
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs/2)
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def documents(idx: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents packed in idx (B, T), each opened by a `start` token (a chat run's
    conversations, each beginning with <|endoftext|>; tokens before a row's first one count as
    a document too): each token's position within its document (B, T), and the block-diagonal
    causal mask (B, 1, T, T), True where a query sees a key (its own document's past and
    itself). Positions restart so that a conversation reads as it does alone at position 0,
    as `folio chat` and the server show it to the model."""
    T = idx.size(1)
    at = torch.arange(T, device=idx.device)  # (T,)
    first = torch.where(idx == start, at, 0).cummax(dim=1).values  # (B, T): its document's start
    same = first[:, :, None] == first[:, None, :]  # (B, T, T)
    causal = at[:, None] >= at[None, :]  # (T, T)
    return at - first, (same & causal)[:, None]  # (B, T), (B, 1, T, T)


class CausalAttention(nn.Module):
    """The one attention call: softmax(q kᵀ / √hs + causal mask) v, with dropout on the
    weights while training. Parameter-free, so folio.speed can swap in a faster kernel."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """T queries (B, nh, T, hs) at the last T of S positions, over keys and values
        (B, nh, S, hs) of every position so far -> (B, nh, T, hs). `mask` (B, 1, T, S), where
        given, replaces the causal pattern: a float one (rows at positions of their own,
        model/cache.py's RowCache) is added to the scores, 0 where a query sees a key and -inf
        where it does not; a bool one (packed documents, `documents`) is True where it sees."""
        T, S = q.size(2), k.size(2)
        if mask is None and 1 < T < S:  # queries after cached positions: t sees 0..S-T+t
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        dropout = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=mask is None and T > 1)


class CausalSelfAttention(nn.Module):
    """Multi-head attention; with n_kv_head < n_head, grouped-query: each key/value head
    serves n_head / n_kv_head consecutive query heads (the cache holds the kv heads only)."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.n_kv_head, hs = config.n_head, config.kv_heads, config.head_size
        self.sizes = (self.n_head * hs, self.n_kv_head * hs, self.n_kv_head * hs)  # q, k, v
        self.layer = layer  # this block's slot in a KVCache
        self.c_attn = nn.Linear(config.n_embd, sum(self.sizes), bias=config.bias)
        if config.qk_norm:  # per head, over hs; parameter-free unless norm_weight
            self.q_norm, self.k_norm = rms_norm(config, hs), rms_norm(config, hs)
        self.qk_norm = config.qk_norm
        self.attention = CausalAttention(config.dropout)
        self.c_proj = nn.Linear(self.sizes[0], config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | RowCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) at positions cache.length.. (0.. without a cache; a RowCache: each
        row's own) -> (B, T, C); rope: the rotary cos/sin of those positions, or None;
        mask: without a cache, packed documents' (B, 1, T, T) (`documents`), or None."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)  # (B, T, nh*hs), 2 x (B, T, nkv*hs)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_head, -1).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # before the keys are cached: cached keys keep their rotation
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None:  # keys and values of every position so far (in the cache's dtype)
            k, v = cache.update(self.layer, k, v)  # (B, nkv, length + T, hs)
            mask = cache.mask(T)  # None but for a RowCache
        if self.n_kv_head != self.n_head:  # each kv head to its group of query heads
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = self.attention(q.to(k.dtype), k, v, mask).to(q.dtype)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.sizes[0])  # heads merged
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """act(x W_fc) W_proj; gated (swiglu): c_fc holds the gate's rows, then the up rows, and
    act(gate) * up goes on."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.mlp in GATED
        hidden = config.mlp_width
        self.c_fc = nn.Linear(config.n_embd, (1 + self.gated) * hidden, bias=config.bias)
        self.act = ACTIVATIONS[config.mlp]()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, H), gated: (B, T, 2H)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # (B, T, H) each
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | RowCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, rope, mask)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class CrossEntropy(nn.Module):
    """The one loss: mean cross-entropy of the output head's logits over the real vocabulary
    (the table's padding rows are no tokens), soft-capped as the config says; targets of -1
    do not count. Parameter-free, so folio.speed can swap in a fused kernel."""

    def __init__(self, vocab_size: int, softcap: float):
        super().__init__()
        self.vocab_size, self.softcap = vocab_size, softcap

    def forward(self, x: torch.Tensor, head: torch.Tensor, targets: torch.Tensor
                ) -> torch.Tensor:
        """x (N, C) hidden states, head (V_padded, C) the output weight, targets (N,)."""
        logits = softcap(F.linear(x, head[:self.vocab_size]), self.softcap)  # (N, V)
        return F.cross_entropy(logits.float(), targets, ignore_index=-1)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap); the logits unchanged for cap 0."""
    return cap * torch.tanh(logits / cap) if cap else logits


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        layers = dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),  # no table with rotary
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm_layer(config),
        )
        if config.rope:
            del layers["wpe"]
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_head:
            self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        self.loss = CrossEntropy(config.vocab_size, config.logit_softcap)
        self.cache_dtype: torch.dtype | None = None  # new KV caches' dtype; None: the model's
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the stream's variance
        # does not grow with depth; or start them at zero (each block starts as the identity).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
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
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def new_cache(self, batch_size: int = 1, dtype: torch.dtype | None = None,
                  rows: bool = False) -> KVCache | RowCache:
        """An empty KV cache for `batch_size` sequences of up to block_size tokens, on the
        model's device, in `dtype` (default: cache_dtype, else the model's); with `rows`, a
        `RowCache` (rows of their own lengths, added as they come) instead."""
        cfg = self.config
        like = self.transformer.wte.weight
        shape = (cfg.n_layer, cfg.kv_heads, cfg.head_size, cfg.block_size)
        dtype = dtype or self.cache_dtype or like.dtype
        if rows:
            return RowCache(*shape, dtype, like.device)
        return KVCache(*shape, batch_size, dtype, like.device)

    def hidden(self, idx: torch.Tensor, cache: KVCache | RowCache | None = None,
               doc_start: int | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) for token ids idx (B, T), placed after what
        `cache` holds (and then added to it; a RowCache: each row after its own), or at
        positions 0..T-1 without one; with `doc_start` (no cache), idx holds documents packed
        one after another, each opened by that token: each attends within itself only, from
        position 0 (`documents`)."""
        T = idx.size(1)
        end = T + (0 if cache is None else cache.length)
        if end > self.config.block_size:
            raise ValueError(f"sequence of {end} tokens exceeds block_size "
                             f"{self.config.block_size}")
        mask = None
        if doc_start is None:
            pos = positions(cache, T, idx.device)  # (T,), or (B, T) for a RowCache
        elif cache is None:
            pos, mask = documents(idx, doc_start)  # (B, T), (B, 1, T, T)
        else:
            raise ValueError("packed documents (doc_start) are for passes without a KV cache")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.rope:
            cfg = self.config
            rope = rotary(pos, cfg.head_size, cfg.rope_theta, cfg.rope_scaling)  # 2 x (.., T, hs/2)
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache, rope, mask)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | RowCache | None = None, doc_start: int | None = None
                ) -> torch.Tensor:
        """The model's one forward pass, for training, evaluation, prefill and decoding.

        idx (B, T): token ids. With targets (B, T), returns the mean cross-entropy over the
        real vocabulary, a scalar (targets of -1 do not count). Without, returns the logits
        (B, V) for the token after each sequence: only the last position goes through the
        output head. With a cache, idx continues the sequences it holds (see KVCache). With
        `doc_start`, idx packs documents each opened by that token, kept apart (`hidden`).
        """
        x = self.hidden(idx, cache, doc_start)  # (B, T, C)
        if targets is None:
            return self.logits(x[:, -1, :])  # (B, V)
        return self.loss(x.flatten(0, 1), self.lm_head.weight, targets.flatten())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., V) over the real vocabulary, soft-capped."""
        return softcap(self.lm_head(x)[..., :self.config.vocab_size], self.config.logit_softcap)

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int) -> None:
        """Make room for tokens added after the vocabulary (a chat template's roles): the
        table and the output head grow to the new padded size, old rows kept as they are,
        each new row the mean of the real rows (a token like an average one, so the first
        logits of a new token are ordinary, not random)."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
        self.config.vocab_size = vocab_size
        rows = self.config.padded_vocab_size

        def grown(weight: torch.Tensor) -> nn.Parameter:  # (V_padded_old, C) -> (rows, C)
            new = weight.new_zeros(rows, weight.size(1))
            new[:old] = weight[:old]
            new[old:vocab_size] = weight[:old].mean(dim=0)
            return nn.Parameter(new)

        self.transformer.wte.weight = grown(self.transformer.wte.weight)
        self.transformer.wte.num_embeddings = rows
        if self.config.tie_head:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            self.lm_head.weight = grown(self.lm_head.weight)
        self.lm_head.out_features = rows
        self.loss.vocab_size = vocab_size

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (e.g. a 1024-token GPT-2 finetuned at 256 tokens)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B."""
        cfg = self.config
        n = self.num_params()
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * seq_len
