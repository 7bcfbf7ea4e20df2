"""GPT-2 weights from and to Hugging Face transformers (hf_import's GPT-2 case, `folio
export`), and the transformers model of a dir, the HF cache or the hub (any class hf_import takes).

Hugging Face GPT-2 stores its Linear layers as Conv1D (weight shaped (in, out)); folio and
nanoGPT use nn.Linear ((out, in)), so those four weights are transposed on the way in and out.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from folio.errors import CheckpointError, ConfigError
from folio.extras import need
from folio.model.gpt import GPT, IMPORTED_SHAPE, GPTConfig
from folio.store.weights import BUFFERS, gpt_from_state

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GPT2_CLASSES = {"gpt2": "GPT2LMHeadModel"}  # model_type: transformers class
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")
# Hugging Face GPT-2 uses the tanh GELU approximation; folio's MLP uses the exact GELU (as
# nanoGPT does). Exports declare the exact one so transformers reproduces folio's logits.
GELU_NAMES = ("gelu", "gelu_new", "gelu_pytorch_tanh")
VOCAB_NOTE = "folio_vocab.json"  # a char-level export's vocabulary, as folio reads it back
GPT2_VOCAB = 50257


def transformers_module():
    transformers = need("transformers", "hf", "Hugging Face support")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # no retry chatter
    return transformers


# ---------------------------------------------------------------------------- import

def gpt_from_hf(hf_model: Any, dropout: float, source: str) -> GPT:
    """A folio GPT holding a transformers GPT2LMHeadModel's weights."""
    config = gpt_config_from_hf(hf_model.config, dropout, source=source)
    return gpt_from_state(config, from_hf_state_dict(hf_model.state_dict()), source=source)


def tokenizer_spec(directory: Path, vocab_size: int) -> dict[str, Any]:
    """The tokenizer of a GPT-2 dir: a folio char vocabulary (folio_vocab.json) or GPT-2's BPE."""
    note = directory / VOCAB_NOTE
    if note.is_file():
        try:
            return json.loads(note.read_text("utf-8"))["tokenizer"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{note} is not a folio vocabulary note ({e})") from None
    if vocab_size != GPT2_VOCAB:
        raise CheckpointError(f"{directory}: a {vocab_size}-token model without {VOCAB_NOTE}; "
                              "folio only knows GPT-2's tokenizer for it, which has "
                              f"{GPT2_VOCAB} tokens")
    return {"kind": "gpt2"}


def load_hf_model(name_or_path: str, classes: dict[str, str]):
    """The transformers model of a local dir, or of a model name from the HF cache (then the
    hub); `classes`: {model_type: class name} it may be."""
    transformers = transformers_module()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; init_from=<dir> needs a Hugging "
                                  "Face model directory (config.json + model.safetensors)")
        return _from_pretrained(transformers, str(path), True, classes)
    if name_or_path not in GPT2_NAMES:
        raise ConfigError(f"init_from={name_or_path!r} is neither a GPT-2 model "
                          f"({', '.join(GPT2_NAMES)}), a Hugging Face hub id (owner/name) nor "
                          "an existing directory")
    try:  # the cache first: no network round trip when the weights are already here
        return _from_pretrained(transformers, name_or_path, True, classes)
    except CheckpointError:
        pass
    try:
        if not hub_reachable():
            raise CheckpointError("offline")
        return _from_pretrained(transformers, name_or_path, False, classes)
    except CheckpointError:
        raise CheckpointError(
            f"cannot load {name_or_path!r}: its weights are not in the Hugging Face cache and "
            f"the hub is unreachable; run `huggingface-cli download {name_or_path}` where there "
            "is network, or pass init_from=<local dir with config.json + model.safetensors>"
        ) from None


def hub_reachable() -> bool:
    """False when the hub's host name does not resolve (offline), instead of letting
    huggingface_hub retry for half a minute. Behind a proxy, assume it is reachable."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.getaddrinfo(host.hostname or "huggingface.co", 443)
    except OSError:
        return False
    return True


def _from_pretrained(transformers, name_or_path: str, local_files_only: bool,
                     classes: dict[str, str]):
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path,
                                                         local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the config of {name_or_path!r}: {e}") from None
    if config.model_type not in classes:
        found = ", ".join(config.architectures or []) or config.model_type
        raise CheckpointError(f"{name_or_path} is a {found} model; folio loads "
                              f"{', '.join(classes.values())}")
    try:  # safetensors preferred; a .bin is read by transformers with weights_only=True
        return getattr(transformers, classes[config.model_type]).from_pretrained(
            name_or_path, local_files_only=local_files_only, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the weights of {name_or_path!r}: {e}") from None


def gpt_config_from_hf(hf_config: Any, dropout: float, source: str) -> GPTConfig:
    """folio's GPTConfig for a transformers GPT2Config; unsupported variants are refused."""
    n_inner = getattr(hf_config, "n_inner", None)
    unsupported = [
        (hf_config.activation_function not in GELU_NAMES, "activation_function"),
        (n_inner not in (None, 4 * hf_config.n_embd), "n_inner"),
        (abs(hf_config.layer_norm_epsilon - 1e-5) > 1e-12, "layer_norm_epsilon"),
        (not getattr(hf_config, "scale_attn_weights", True), "scale_attn_weights"),
        (getattr(hf_config, "scale_attn_by_inverse_layer_idx", False),
         "scale_attn_by_inverse_layer_idx"),
    ]
    for bad, key in unsupported:
        if bad:
            raise CheckpointError(f"{source}: GPT-2 variant with {key}="
                                  f"{getattr(hf_config, key)!r} is not supported by folio's model")
    return GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                     n_layer=hf_config.n_layer, n_head=hf_config.n_head,
                     n_embd=hf_config.n_embd, dropout=dropout, bias=True,
                     tie_head=bool(getattr(hf_config, "tie_word_embeddings", True)))


def from_hf_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors renamed/transposed to folio's (nanoGPT's) layout; buffers dropped."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith(BUFFERS):
            continue
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        state[name] = tensor.float().contiguous()
    return state


# ---------------------------------------------------------------------------- export

def check_gpt2_exact(cfg: GPTConfig) -> None:
    """Refuse (one line, naming the setting) a model transformers' GPT-2 cannot compute exactly."""
    default = GPTConfig()
    for key in ("rope", "norm", "qk_norm", "mlp", "logit_softcap", *IMPORTED_SHAPE):
        if getattr(cfg, key) != getattr(default, key):
            raise ConfigError(f"cannot export as Hugging Face GPT-2: {key}={getattr(cfg, key)!r} "
                              "has no exact transformers GPT-2 equivalent (GPT-2 takes the "
                              "nanoGPT recipe; rotary RMSNorm models export as "
                              "Llama/Qwen3/Apertus/Arcee)")


def gpt2_tensors(model: GPT, conv1d: bool = True) -> dict[str, torch.Tensor]:
    """A folio GPT's tensors as GPT-2 has them, float32: the vocab sliced to the real
    vocab_size, zero biases for a bias-free model (the same function, since GPT-2 always has
    biases), the four Linear weights as Conv1D (in, out) unless conv1d=False."""
    check_gpt2_exact(model.config)
    cfg = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32)
        bias = name.removesuffix(".weight") + ".bias"
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:cfg.vocab_size]  # drop the padding rows
        elif not cfg.bias and name.endswith(".weight") and "wpe" not in name:
            state[bias] = torch.zeros(tensor.shape[0])  # LayerNorm (C,) or Linear (out, in)
        if conv1d and name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()  # Linear (out, in) -> Conv1D (in, out)
        state[name] = tensor.contiguous()
    return state


def to_hf_state_dict(model: GPT, eot_id: int | None = None
                     ) -> tuple[Any, dict[str, torch.Tensor]]:
    """(transformers GPT2Config, GPT2LMHeadModel state dict) for a folio GPT; eot_id becomes
    bos/eos_token_id."""
    state = gpt2_tensors(model)
    cfg = model.config
    hf_config = transformers_module().GPT2Config(
        bos_token_id=eot_id, eos_token_id=eot_id,
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu",
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        layer_norm_epsilon=1e-5, tie_word_embeddings=cfg.tie_head,
        architectures=["GPT2LMHeadModel"])
    return hf_config, state


def to_hf_model(model: GPT, eot_id: int | None = None):
    """A transformers GPT2LMHeadModel computing the same logits as `model`."""
    transformers = transformers_module()
    hf_config, state = to_hf_state_dict(model, eot_id)
    hf_model = transformers.GPT2LMHeadModel(hf_config)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(BUFFERS)]
    assert not missing and not unexpected, (missing, unexpected)
    return hf_model.eval()
