"""`folio export --format gguf`: a run as one GGUF file for llama.cpp, Ollama and LM Studio,
with an Ollama Modelfile beside it.

The weights are the Hugging Face export's (store/hf.py, store/hf_rotary.py) under llama.cpp's
tensor names (gguf's own name map): the nanoGPT recipe as llama.cpp's `gpt2` architecture,
the modern recipe as `apertus` (QK-norm) or `arcee` (no QK-norm). Apertus's MLP activation is
xIELU, which with alpha_p = 1, alpha_n = 0 and beta = 0 is exactly ReLU² (x > 0: alpha_p x² +
beta x; else alpha_n (expm1(min(x, eps)) - x) + beta x); llama.cpp passes alpha_p and alpha_n
through softplus, so the file holds softplus's inverses: log(e - 1) for 1, and -1e4 for 0.
Arcee's MLP is ReLU² itself; its rotary pairs are adjacent rows (llama.cpp's "norm" rope, as
for Llama), so its query and key rows are interleaved from the Hugging Face halves, as
llama.cpp's convert_hf_to_gguf.py does. The vocabulary: store/gguf_vocab.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from folio.data.tokenizer import AddedTokens
from folio.errors import ConfigError
from folio.extras import need
from folio.model.gpt import GPT, IMPORTED_SHAPE, ROPE_BASE, GPTConfig
from folio.store import gguf_vocab, hf, hf_rotary
from folio.store.gguf_vocab import Vocab

# xIELU's raw parameters that make it ReLU² after llama.cpp's softplus (see the docstring)
RELU2_XIELU = {"alpha_p": math.log(math.e - 1), "alpha_n": -1e4, "beta": 0.0, "eps": -1e-6}
FOLIO_SHAPE = GPTConfig()  # the shape options of folio's own models (imported ones differ)


def architecture(model: GPT) -> str:
    """llama.cpp's architecture computing `model` (gpt2, apertus or arcee), or a one-line
    refusal."""
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
    if cfg.mlp != "relu2":
        raise ConfigError(f"cannot export as GGUF: mlp={cfg.mlp!r}; folio writes rotary models "
                          "as llama.cpp's apertus or arcee architectures, whose MLPs compute "
                          "ReLU² only (export --format hf instead)")
    if kind == "arcee" and cfg.bias:
        raise ConfigError("cannot export as GGUF: bias=True without qk_norm; llama.cpp's arcee "
                          "architecture has no biases (export --format hf instead)")
    return kind


def check(model: GPT, tokenizer: Any) -> Vocab:
    """Every refusal, before anything is written: the vocabulary llama.cpp will read."""
    architecture(model)
    if isinstance(tokenizer, AddedTokens):
        raise ConfigError(f"cannot export a chat run's added tokens ({' '.join(tokenizer.added)})"
                          " as GGUF yet; export it with --format hf (its chat_template "
                          "included)")
    return gguf_vocab.vocabulary(tokenizer, model.config.vocab_size)


def write_gguf(model: GPT, vocab: Vocab, path: Path, dtype: str, name: str) -> None:
    """One GGUF file at `path`: metadata, the vocabulary (`check`'s) and the weights in
    `dtype`."""
    gguf = need("gguf", "gguf", "GGUF export")
    arch = architecture(model)
    cfg = model.config
    head_size = cfg.n_embd // cfg.n_head
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
        writer.add_rope_dimension_count(head_size)
        writer.add_key_length(head_size)
        writer.add_value_length(head_size)
        state = hf_rotary.to_hf_state_dict(model)
        if arch == "apertus":
            for key, value in RELU2_XIELU.items():
                getattr(writer, f"add_xielu_{key}")([value] * cfg.n_layer)
        else:
            state = {k: interleave_rotary(k, v, cfg.n_head) for k, v in state.items()}
        # llama.cpp's apertus needs output.weight even when it is the embedding (arcee too,
        # in older llama.cpp)
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    add_vocabulary(writer, gguf, vocab)
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


def interleave_rotary(key: str, tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """A Hugging Face query or key projection with each head's rows (x_i, x_{i+hs/2}) made
    adjacent, the pairs llama.cpp's "norm" rope turns (convert_hf_to_gguf.py's permute);
    other tensors as they are."""
    if not key.endswith(("q_proj.weight", "k_proj.weight")):
        return tensor
    rows = tensor.shape[0]
    return (tensor.reshape(n_head, 2, rows // n_head // 2, *tensor.shape[1:])
            .transpose(1, 2).reshape(tensor.shape).contiguous())


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


def add_vocabulary(writer: Any, gguf: Any, vocab: Vocab) -> None:
    """The vocabulary's keys: tokenizer model, tokens and their types, the pre-tokenizer and
    merges of a byte-level BPE; nothing added around the text (folio adds no BOS)."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types([getattr(gguf.TokenType, t) for t in vocab.types])
    if vocab.model == "llama":
        writer.add_token_scores([0.0] * len(vocab.tokens))
        writer.add_add_space_prefix(False)
    else:
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_merges(vocab.merges)
    if vocab.eot_id is not None:
        writer.add_bos_token_id(vocab.eot_id)
        writer.add_eos_token_id(vocab.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def modelfile(gguf_name: str, vocab: Vocab, block_size: int) -> str:
    """An Ollama Modelfile for the file `gguf_name` beside it: a base model, so the prompt is
    passed as it is; folio sample's defaults; the end-of-text token as the stop word."""
    lines = [f"FROM ./{gguf_name}", 'TEMPLATE """{{ .Prompt }}"""',
             "PARAMETER temperature 0.8", "PARAMETER top_k 200", f"PARAMETER num_ctx {block_size}",
             "PARAMETER num_predict 500"]
    stop = gguf_vocab.eot_text(vocab)
    if stop is not None:
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
