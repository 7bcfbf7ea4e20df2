"""Rotary, RMSNorm models and the standard transformers classes that compute them exactly: the
class for a folio config, and the one tensor layout both ways (export here, import in
hf_import.py).

Four classes, no remote code: Llama (SwiGLU; SmolLM2 is one) and Qwen3 (SwiGLU, per-head
QK-norm), Apertus (per-head QK-norm, a non-gated MLP with any activation, no biases) and Arcee
(non-gated, no QK-norm, biases allowed). folio's own norms have no weights: they are exported
as weights of ones with folio's epsilon (F.rms_norm's default, float32's machine epsilon).
folio rotates the pairs (x_i, x_{i+hs/2}) by minus the angle transformers' `rotate_half` uses;
negating the second half of each head's query and key rows makes them agree (q·k, and the RMS
norm, are unchanged by a sign flip on both sides), and the same negation maps them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

from folio.errors import ConfigError
from folio.model.gpt import GATED, GPT, GPTConfig
from folio.store.hf import transformers_module
from folio.store.weights import BUFFERS

RMS_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's eps=None in float32
HIDDEN_ACT = {"relu2": "relu2", "gelu": "gelu", "xielu": "xielu", "swiglu": "silu"}  # exact
# model_type: (config class, model class, pre-attention norm, pre-MLP norm)
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "input_layernorm", "post_attention_layernorm"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "input_layernorm", "post_attention_layernorm"),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", "attention_layernorm",
                "feedforward_layernorm"),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", "input_layernorm", "post_attention_layernorm"),
}
QK_NORM_CLASSES = frozenset({"qwen3", "apertus"})  # always with learned q/k norms


class Piece(NamedTuple):
    """Rows of one folio tensor that are one transformers tensor."""

    name: str  # the transformers tensor
    rows: int  # how many of the folio tensor's rows it holds
    flip_heads: int = 0  # heads whose rows' second half is negated (q and k), 0: none


def model_type(cfg: GPTConfig) -> str:
    """The transformers model_type that computes `cfg` exactly, or a one-line ConfigError."""
    gated = cfg.mlp in GATED
    refusals = [
        (not cfg.rope, "rope=False", "rotary positions"),
        (cfg.norm != "rmsnorm", f"norm={cfg.norm!r}", "norm='rmsnorm'"),
        (cfg.logit_softcap != 0, f"logit_softcap={cfg.logit_softcap:g}",
         "no logit soft-cap (the classes that cap logits, Gemma 2 and NanoChat, also normalise "
         "other activations folio does not)"),
        (cfg.qk_norm and cfg.bias, "bias=True with qk_norm=True",
         "no biases (Qwen3 and Apertus, the classes with per-head QK-norm, have no MLP "
         "biases)"),
        (cfg.mlp == "xielu" and not cfg.qk_norm, "mlp='xielu' without qk_norm",
         "qk_norm (Apertus, the class with xIELU, has it)"),
    ]
    for bad, setting, needed in refusals:
        if bad:
            raise ConfigError(f"cannot export as a Hugging Face Llama/Qwen3/Apertus/Arcee "
                              f"model: {setting}; these classes need {needed}")
    if gated:
        return "qwen3" if cfg.qk_norm else "llama"
    return "apertus" if cfg.qk_norm else "arcee"


def rope_parameters(cfg: GPTConfig) -> dict[str, Any]:
    """transformers' rope_parameters for cfg's rotation."""
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    return {**scaling, "rope_theta": cfg.rope_theta}


def hf_config(cfg: GPTConfig, eot_id: int | None) -> Any:
    """The transformers config of `cfg`'s class (model_type), vocabulary cropped."""
    kind = model_type(cfg)
    config_class = getattr(transformers_module(), CLASSES[kind][0])
    extra = {"mlp_bias": cfg.bias} if kind in ("llama", "arcee") else {}
    return config_class(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size,
        hidden_act=HIDDEN_ACT[cfg.mlp], max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps or RMS_EPS, rope_parameters=rope_parameters(cfg),
        tie_word_embeddings=cfg.tie_head, attention_bias=cfg.bias,
        attention_dropout=cfg.dropout, bos_token_id=eot_id, eos_token_id=eot_id,
        pad_token_id=None, architectures=[CLASSES[kind][1]], **extra)


def layout(cfg: GPTConfig, kind: str) -> dict[str, list[Piece]]:
    """Each folio tensor -> the transformers tensors it is, in row order, for class `kind`.
    Norm weights appear only where folio has them (norm_weight); export writes ones for the
    others (weightless_norms)."""
    hs, H = cfg.head_size, cfg.mlp_width
    q_rows, kv_rows = cfg.n_head * hs, cfg.kv_heads * hs
    norm_1, norm_2 = CLASSES[kind][2:]
    out = {"transformer.wte.weight": [Piece("model.embed_tokens.weight", cfg.vocab_size)]}
    if not cfg.tie_head:
        out["lm_head.weight"] = [Piece("lm_head.weight", cfg.vocab_size)]
    if cfg.norm_weight:
        out["transformer.ln_f.weight"] = [Piece("model.norm.weight", cfg.n_embd)]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        attn, mlp = f"{theirs}self_attn.", f"{theirs}mlp."
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            out[f"{ours}attn.c_attn.{suffix}"] = [
                Piece(f"{attn}q_proj.{suffix}", q_rows, cfg.n_head),
                Piece(f"{attn}k_proj.{suffix}", kv_rows, cfg.kv_heads),
                Piece(f"{attn}v_proj.{suffix}", kv_rows)]
            out[f"{ours}attn.c_proj.{suffix}"] = [Piece(f"{attn}o_proj.{suffix}", cfg.n_embd)]
            up = [Piece(f"{mlp}up_proj.{suffix}", H)]
            out[f"{ours}mlp.c_fc.{suffix}"] = (
                [Piece(f"{mlp}gate_proj.{suffix}", H), *up] if cfg.mlp in GATED else up)
            out[f"{ours}mlp.c_proj.{suffix}"] = [Piece(f"{mlp}down_proj.{suffix}", cfg.n_embd)]
        if cfg.norm_weight:
            out[f"{ours}ln_1.weight"] = [Piece(f"{theirs}{norm_1}.weight", cfg.n_embd)]
            out[f"{ours}ln_2.weight"] = [Piece(f"{theirs}{norm_2}.weight", cfg.n_embd)]
            if cfg.qk_norm:
                out[f"{ours}attn.q_norm.weight"] = [Piece(f"{attn}q_norm.weight", hs)]
                out[f"{ours}attn.k_norm.weight"] = [Piece(f"{attn}k_norm.weight", hs)]
        if cfg.mlp == "xielu":
            for alpha in ("alpha_p", "alpha_n"):
                out[f"{ours}mlp.act.{alpha}"] = [Piece(f"{mlp}act_fn.{alpha}", 1)]
    return out


def weightless_norms(cfg: GPTConfig, kind: str) -> dict[str, int]:
    """The transformers norm weights (name: width) of a folio model without norm weights."""
    if cfg.norm_weight:
        return {}
    norm_1, norm_2 = CLASSES[kind][2:]
    out = {"model.norm.weight": cfg.n_embd}
    for i in range(cfg.n_layer):
        layer = f"model.layers.{i}."
        out |= {f"{layer}{norm_1}.weight": cfg.n_embd, f"{layer}{norm_2}.weight": cfg.n_embd}
        if kind in QK_NORM_CLASSES:
            out |= {f"{layer}self_attn.q_norm.weight": cfg.head_size,
                    f"{layer}self_attn.k_norm.weight": cfg.head_size}
    return out


def flip_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """t (heads*hs, ...) with the second half of each head's rows negated (folio's rotation
    direction <-> rotate_half's; its own inverse); t itself for heads=0."""
    if not heads:
        return t
    halves = t.reshape(heads, 2, -1, *t.shape[1:]).clone()  # (heads, 2, hs/2, ...)
    halves[:, 1] *= -1
    return halves.reshape(t.shape)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """folio's tensors under the names of model_type(model.config), float32."""
    cfg = model.config
    kind = model_type(cfg)
    src = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()
           if not k.endswith(BUFFERS)}
    state = {name: torch.ones(width) for name, width in weightless_norms(cfg, kind).items()}
    for ours, pieces in layout(cfg, kind).items():
        rows = src[ours][:sum(p.rows for p in pieces)]  # the embedding's padding dropped
        for piece, part in zip(pieces, rows.split([p.rows for p in pieces]), strict=True):
            state[piece.name] = flip_halves(part, piece.flip_heads)
    return {k: v.contiguous() for k, v in state.items()}


def to_hf_model(model: GPT, eot_id: int | None = None) -> Any:
    """A transformers Llama, Qwen3, Apertus or Arcee model computing `model`'s logits."""
    config = hf_config(model.config, eot_id)
    model_class = getattr(transformers_module(), CLASSES[config.model_type][1])
    hf_model = model_class(config)
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (model.config.tie_head and k == "lm_head.weight")
               and not k.endswith(("act_fn.beta", "act_fn.eps"))]
    assert not missing and not unexpected, (missing, unexpected)
    return hf_model.eval()


def add_legacy_rope_keys(config_file: Path, cfg: GPTConfig) -> None:
    """Write the rotary settings into a saved config.json where transformers 4.x reads them
    (without them it would give Apertus its default llama3-scaled, base 1.2e7 rotation; 5.x
    reads rope_parameters)."""
    config = json.loads(config_file.read_text("utf-8"))
    config.update(rope_theta=cfg.rope_theta,
                  rope_scaling=cfg.rope_scaling or {"rope_type": "default"})
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
