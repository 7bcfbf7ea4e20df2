"""Rotary, RMSNorm models (the modern recipe) out to standard transformers classes.

Two classes compute folio's modern blocks exactly, without remote code: Apertus (per-head
QK-norm, a non-gated MLP with any activation, no biases) and Arcee (the same without QK-norm,
biases allowed). folio's norms have no weights: the exported norms get weights of ones and
folio's epsilon (F.rms_norm's default, float32's machine epsilon). folio rotates the pairs
(x_i, x_{i+hs/2}) by minus the angle transformers' `rotate_half` uses; negating the second
half of each head's query and key rows makes them agree (q·k, and the RMS norm, are unchanged
by a sign flip on both sides).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from folio.errors import ConfigError
from folio.model.gpt import GPT, ROPE_BASE, GPTConfig
from folio.store.hf import transformers_module
from folio.store.weights import BUFFERS

RMS_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's eps=None in float32
ACTIVATIONS = {"relu2": "relu2", "gelu": "gelu"}  # folio mlp -> transformers hidden_act (exact)
# transformers 4.x reads rotary settings from these keys, and without them would give Apertus
# its default (llama3-scaled, base 1.2e7) rotation; 5.x reads rope_parameters.
LEGACY_ROPE_KEYS = {"rope_theta": ROPE_BASE, "rope_scaling": {"rope_type": "default"}}
# model_type: (config class, model class, pre-attention norm, pre-MLP norm)
CLASSES = {
    "apertus": ("ApertusConfig", "ApertusForCausalLM", "attention_layernorm",
                "feedforward_layernorm"),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", "input_layernorm", "post_attention_layernorm"),
}


def model_type(cfg: GPTConfig) -> str:
    """The transformers model_type that computes `cfg` exactly, or a one-line ConfigError."""
    refusals = [
        (not cfg.rope, "rope=False", "rotary positions"),
        (cfg.norm != "rmsnorm", f"norm={cfg.norm!r}", "norm='rmsnorm'"),
        (cfg.mlp not in ACTIVATIONS, f"mlp={cfg.mlp!r}", "mlp relu2 or gelu"),
        (cfg.logit_softcap != 0, f"logit_softcap={cfg.logit_softcap:g}",
         "no logit soft-cap (the classes that cap logits, Gemma 2 and NanoChat, also normalise "
         "other activations folio does not)"),
        (cfg.qk_norm and cfg.bias, "bias=True with qk_norm=True",
         "no biases (Apertus, the class with per-head QK-norm and a plain MLP, has no MLP "
         "biases)"),
    ]
    for bad, setting, needed in refusals:
        if bad:
            raise ConfigError(f"cannot export as a Hugging Face Apertus/Arcee model: {setting}; "
                              f"these classes need {needed}")
    return "apertus" if cfg.qk_norm else "arcee"


def hf_config(cfg: GPTConfig, eot_id: int | None) -> Any:
    """The transformers config of `cfg`'s class (model_type), vocabulary cropped."""
    kind = model_type(cfg)
    config_class = getattr(transformers_module(), CLASSES[kind][0])
    extra = {} if kind == "apertus" else {"mlp_bias": cfg.bias}
    return config_class(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head,
        hidden_act=ACTIVATIONS[cfg.mlp], max_position_embeddings=cfg.block_size,
        rms_norm_eps=RMS_EPS, rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
        tie_word_embeddings=cfg.tie_head, attention_bias=cfg.bias,
        attention_dropout=cfg.dropout, bos_token_id=eot_id, eos_token_id=eot_id,
        pad_token_id=None, architectures=[CLASSES[kind][1]], **extra)


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """folio's tensors under the Llama-style names of model_type(model.config), float32."""
    cfg = model.config
    kind = model_type(cfg)
    norm_1, norm_2 = CLASSES[kind][2:]
    C, hs = cfg.n_embd, cfg.n_embd // cfg.n_head
    flip = torch.ones(cfg.n_head, hs)
    flip[:, hs // 2:] = -1  # folio's rotation direction -> rotate_half's
    flip = flip.flatten()
    src = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()
           if not k.endswith(BUFFERS)}
    ones = torch.ones(C)
    state = {"model.embed_tokens.weight": src["transformer.wte.weight"][:cfg.vocab_size],
             "model.norm.weight": ones}
    if not cfg.tie_head:
        state["lm_head.weight"] = src["lm_head.weight"][:cfg.vocab_size]
    for i in range(cfg.n_layer):
        old, new = f"transformer.h.{i}.", f"model.layers.{i}."
        names = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj",
                 "mlp.c_proj": "mlp.down_proj"}
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = src[f"{old}attn.c_attn.{suffix}"].split(C)
            flip_rows = flip if suffix == "bias" else flip[:, None]
            state[f"{new}self_attn.q_proj.{suffix}"] = q * flip_rows
            state[f"{new}self_attn.k_proj.{suffix}"] = k * flip_rows
            state[f"{new}self_attn.v_proj.{suffix}"] = v
            for ours, theirs in names.items():
                state[f"{new}{theirs}.{suffix}"] = src[f"{old}{ours}.{suffix}"]
        state[f"{new}{norm_1}.weight"] = ones
        state[f"{new}{norm_2}.weight"] = ones
        if cfg.qk_norm:
            state[f"{new}self_attn.q_norm.weight"] = torch.ones(hs)
            state[f"{new}self_attn.k_norm.weight"] = torch.ones(hs)
    return {k: v.contiguous() for k, v in state.items()}


def to_hf_model(model: GPT, eot_id: int | None = None) -> Any:
    """A transformers Apertus or Arcee model computing the same logits as `model`."""
    config = hf_config(model.config, eot_id)
    model_class = getattr(transformers_module(), CLASSES[config.model_type][1])
    hf_model = model_class(config)
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (model.config.tie_head and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    return hf_model.eval()


def add_legacy_rope_keys(config_file: Path) -> None:
    """Write the rotary settings into a saved config.json where transformers 4.x reads them."""
    config = json.loads(config_file.read_text("utf-8"))
    config.update(LEGACY_ROPE_KEYS)
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
