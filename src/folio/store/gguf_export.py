"""`folio export --format gguf`: a run as one GGUF file for llama.cpp, Ollama and LM Studio,
with an Ollama Modelfile beside it.

The weights are the Hugging Face export's (store/hf.py, store/hf_rotary.py) under llama.cpp's
tensor names (gguf's own name map): the nanoGPT recipe as llama.cpp's `gpt2` architecture,
the modern recipe as `apertus`. Apertus's MLP activation is xIELU, which with alpha_p = 1,
alpha_n = 0 and beta = 0 is exactly ReLU² (x > 0: alpha_p x² + beta x; else
alpha_n (expm1(min(x, eps)) - x) + beta x); llama.cpp passes alpha_p and alpha_n through
softplus, so the file holds softplus's inverses: log(e - 1) for 1, and -1e4 for 0.

GPT-2's vocabulary is its byte-level BPE (`tokenizer.ggml.model = gpt2`); a character
vocabulary is a sentencepiece one (`llama`): one piece per character, a space spelled U+2581, no
space prefix, which llama.cpp tokenizes per character for any Unicode text (a byte-level BPE
without merges is not loadable there, and gguf writes no empty merge list).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from folio.data.tokenizer import (
    GPT2_EOT,
    AddedTokens,
    CharTokenizer,
    GPT2Tokenizer,
    gpt2_vocab_file,
)
from folio.errors import ConfigError
from folio.extras import need
from folio.model.gpt import GPT, IMPORTED_SHAPE, ROPE_BASE, GPTConfig
from folio.store import hf, hf_rotary

# xIELU's raw parameters that make it ReLU² after llama.cpp's softplus (see the docstring)
RELU2_XIELU = {"alpha_p": math.log(math.e - 1), "alpha_n": -1e4, "beta": 0.0, "eps": -1e-6}
GPT2_PRE = "gpt-2"  # llama.cpp's name for GPT-2's pre-tokenizer regex
SPM_SPACE = "\u2581"
FOLIO_SHAPE = GPTConfig()  # how a sentencepiece vocabulary spells a space


def architecture(model: GPT) -> str:
    """llama.cpp's architecture computing `model` (gpt2 or apertus), or a one-line refusal."""
    cfg = model.config
    if not (cfg.rope or cfg.norm == "rmsnorm"):
        hf.check_gpt2_exact(cfg)
        return "gpt2"
    kind = hf_rotary.model_type(cfg)
    imported = [f"{k}={getattr(cfg, k)!r}" for k in IMPORTED_SHAPE
                if getattr(cfg, k) != getattr(FOLIO_SHAPE, k)]
    if imported:
        raise ConfigError(f"cannot export as GGUF: {imported[0]}; folio writes GGUF for the "
                          "shapes it trains (export --format hf instead)")
    if kind != "apertus" or cfg.mlp != "relu2":
        setting = "qk_norm=False" if kind != "apertus" else f"mlp={cfg.mlp!r}"
        raise ConfigError(f"cannot export as GGUF: {setting}; folio writes rotary models as "
                          "llama.cpp's apertus architecture, which needs qk_norm=True and "
                          "mlp='relu2' (export --format hf instead)")
    return "apertus"


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse (one line) a vocabulary folio cannot write as GGUF."""
    if isinstance(tokenizer, AddedTokens):
        raise ConfigError(f"cannot export a chat run's added tokens ({' '.join(tokenizer.added)})"
                          " as GGUF yet; export it with --format hf (its chat_template "
                          "included)")
    if not isinstance(tokenizer, CharTokenizer | GPT2Tokenizer):
        raise ConfigError(f"cannot export a {tokenizer.kind!r} tokenizer as GGUF: llama.cpp "
                          "picks a pre-tokenizer by name, and folio writes GGUF for char and "
                          "gpt2 vocabularies only (export --format hf instead)")
    if isinstance(tokenizer, CharTokenizer) and SPM_SPACE in tokenizer.chars:
        raise ConfigError("cannot export this character vocabulary as GGUF: it holds "
                          f"{SPM_SPACE!r} (U+2581), which llama.cpp's sentencepiece vocabulary "
                          "reads as a space")


def write_gguf(model: GPT, tokenizer: Any, path: Path, dtype: str, name: str) -> None:
    """One GGUF file at `path`: metadata, vocabulary and the weights in `dtype`."""
    gguf = need("gguf", "gguf", "GGUF export")
    arch = architecture(model)
    check_tokenizer(tokenizer)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head)
    writer.add_file_type(FILE_TYPES[dtype](gguf))
    if arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
        state = hf.gpt2_tensors(model, conv1d=False)
        if cfg.tie_head:
            del state["lm_head.weight"]  # llama.cpp uses token_embd for a missing output
    else:
        writer.add_layer_norm_rms_eps(hf_rotary.RMS_EPS)
        writer.add_rope_freq_base(ROPE_BASE)
        writer.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
        writer.add_key_length(cfg.n_embd // cfg.n_head)
        writer.add_value_length(cfg.n_embd // cfg.n_head)
        for key, value in RELU2_XIELU.items():
            getattr(writer, f"add_xielu_{key}")([value] * cfg.n_layer)
        state = hf_rotary.to_hf_state_dict(model)
        # llama.cpp's apertus needs output.weight even when it is the embedding
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    add_vocabulary(writer, gguf, tokenizer)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.n_layer)
    for key, tensor in state.items():
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise AssertionError(f"no GGUF name for {key}")
        data, qtype = encode(gguf, tensor, dtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FILE_TYPES = {  # llama.cpp's file type for each --dtype (the 1-D tensors stay float32)
    "f32": lambda gguf: gguf.LlamaFileType.ALL_F32,
    "f16": lambda gguf: gguf.LlamaFileType.MOSTLY_F16,
    "bf16": lambda gguf: gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": lambda gguf: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def encode(gguf: Any, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type) of one tensor: vectors in float32, matrices in `dtype` (q8_0 needs
    rows of a multiple of 32 values; a matrix without falls back to float16)."""
    types = gguf.GGMLQuantizationType
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    qtype = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[dtype]
    if data.ndim < 2:
        qtype = types.F32
    elif qtype == types.Q8_0 and data.shape[-1] % 32:
        qtype = types.F16
    return gguf.quants.quantize(data, qtype), qtype


def add_vocabulary(writer: Any, gguf: Any, tokenizer: Any) -> None:
    """GPT-2's byte-level BPE (tokens, merges, `<|endoftext|>`), or a character vocabulary as a
    sentencepiece one: one piece per character, a space spelled as U+2581, no space prefix."""
    types = gguf.TokenType
    if isinstance(tokenizer, GPT2Tokenizer):
        vocab = json.loads(gpt2_vocab_file("encoder.json"))
        tokens = sorted(vocab, key=vocab.get)
        token_types = [types.NORMAL] * len(tokens)
        token_types[tokenizer.eot_id] = types.CONTROL
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(GPT2_PRE)
        writer.add_token_list(tokens)
        writer.add_token_merges(gpt2_vocab_file("vocab.bpe").decode("utf-8").split("\n")[1:-1])
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
    else:
        tokens = [SPM_SPACE if c == " " else c for c in tokenizer.chars]
        token_types = [types.NORMAL] * len(tokens)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_add_space_prefix(False)
    writer.add_token_types(token_types)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def modelfile(gguf_name: str, tokenizer: Any, block_size: int) -> str:
    """An Ollama Modelfile for the file `gguf_name` beside it: a base model, so the prompt is
    passed as it is; folio sample's defaults; the end-of-text token as the stop word."""
    lines = [f"FROM ./{gguf_name}", 'TEMPLATE """{{ .Prompt }}"""',
             "PARAMETER temperature 0.8", "PARAMETER top_k 200", f"PARAMETER num_ctx {block_size}",
             "PARAMETER num_predict 500"]
    if tokenizer.eot_id is not None:
        lines.append(f'PARAMETER stop "{GPT2_EOT}"')
    return "\n".join(lines) + "\n"
