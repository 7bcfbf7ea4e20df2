"""Small models in from Hugging Face: a local directory (or a hub id, fetched once into the HF
cache) of a standard class as a folio GPT computing the same logits, with its tokenizer.

LlamaForCausalLM (SmolLM2 is one), Qwen3ForCausalLM, ApertusForCausalLM and ArceeForCausalLM map
through hf_rotary's tensor layout, read the other way (the same q/k row negation turns
transformers' rotation back into folio's); GPT-2 goes through hf.py. Anything these classes
can be that folio does not compute (sliding windows, other rope scalings, biases on some
layers only) is refused in one line naming the class and the supported ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from folio.errors import CheckpointError, DataError
from folio.extras import need
from folio.model.gpt import GPT, GPTConfig
from folio.store import hf, hf_rotary
from folio.store.weights import gpt_from_state

SUPPORTED = {**hf.GPT2_CLASSES, **{kind: c[1] for kind, c in hf_rotary.CLASSES.items()}}
GATED_CLASSES = frozenset({"llama", "qwen3"})  # SwiGLU MLPs; the others are non-gated
MLPS = {True: {"silu": "swiglu"},  # gated: transformers hidden_act -> folio mlp
        False: {"relu2": "relu2", "gelu": "gelu", "xielu": "xielu"}}
ROPE_SCALINGS = ("default", "llama3")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer
TOKENIZER_FILE = "tokenizer.json"


def load_pretrained(name_or_path: str, dropout: float = 0.0,
                    dataset_tokenizer: dict[str, Any] | None = None) -> GPT:
    """A folio GPT holding the weights of a Hugging Face model dir, hub id or GPT-2 name;
    with `dataset_tokenizer` (a dataset's spec), a dataset the model cannot read is refused."""
    source = local_source(name_or_path)
    hf_model = hf.load_hf_model(source, SUPPORTED)
    kind = hf_model.config.model_type
    if dataset_tokenizer is not None and Path(source).is_dir():
        check_dataset_tokenizer(Path(source), kind, dataset_tokenizer)
    if kind == "gpt2":
        return hf.gpt_from_hf(hf_model, dropout, source=name_or_path)
    config = gpt_config(hf_model.config, dropout, source=name_or_path)
    state = from_hf_state_dict(hf_model.state_dict(), config, kind)
    del hf_model
    return gpt_from_state(config, state, source=name_or_path)


def gpt_config(hf_config: Any, dropout: float, source: str) -> GPTConfig:
    """folio's GPTConfig for a Llama/Qwen3/Apertus/Arcee config; what folio cannot compute
    exactly is a one-line CheckpointError."""
    kind = hf_config.model_type
    gated = kind in GATED_CLASSES
    act = hf_config.hidden_act
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    mlp_bias = bool(getattr(hf_config, "mlp_bias", False))  # Qwen3 and Apertus have none
    windowed = getattr(hf_config, "use_sliding_window", False) or any(
        t != "full_attention" for t in getattr(hf_config, "layer_types", None) or [])
    theta, scaling, partial = rope_settings(hf_config)
    refusals = [
        (act not in MLPS[gated], f"hidden_act={act!r}"),
        (attention_bias != mlp_bias, f"attention_bias={attention_bias} with mlp_bias="
         f"{mlp_bias} (folio has biases on every linear layer or none)"),
        (windowed, "sliding-window attention"),
        (partial != 1.0, f"partial_rotary_factor={partial}"),
        (scaling.get("rope_type") not in ROPE_SCALINGS,
         f"rope_scaling {scaling.get('rope_type')!r} (folio implements "
         f"{' and '.join(ROPE_SCALINGS)})"),
    ]
    for bad, setting in refusals:
        if bad:
            refuse(source, hf_config, setting)
    n_embd, n_head = hf_config.hidden_size, hf_config.num_attention_heads
    n_kv_head = getattr(hf_config, "num_key_value_heads", None) or n_head
    head_dim = getattr(hf_config, "head_dim", None) or n_embd // n_head
    hidden = hf_config.intermediate_size
    return GPTConfig(
        block_size=hf_config.max_position_embeddings, vocab_size=hf_config.vocab_size,
        n_layer=hf_config.num_hidden_layers, n_head=n_head, n_embd=n_embd, dropout=dropout,
        bias=attention_bias, rope=True, norm="rmsnorm",
        qk_norm=kind in hf_rotary.QK_NORM_CLASSES, mlp=MLPS[gated][act],
        tie_head=bool(getattr(hf_config, "tie_word_embeddings", False)),
        # 0 where the default already says it, so the run.json reads as folio's own
        n_kv_head=0 if n_kv_head == n_head else n_kv_head,
        head_dim=0 if head_dim * n_head == n_embd else head_dim,
        mlp_hidden=0 if hidden == 4 * n_embd else hidden,
        norm_weight=True, norm_eps=float(hf_config.rms_norm_eps), rope_theta=float(theta),
        rope_scaling=None if scaling["rope_type"] == "default" else scaling)


def rope_settings(hf_config: Any) -> tuple[float, dict[str, Any], float]:
    """(rope_theta, scaling with its rope_type, partial_rotary_factor) of a transformers
    config: rope_parameters (transformers 5) or rope_theta and rope_scaling (4.x)."""
    params = dict(getattr(hf_config, "rope_parameters", None)
                  or getattr(hf_config, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None)
    partial = float(params.pop("partial_rotary_factor", None)
                    or getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")
        params = {k: params[k] for k in keys}
    return float(theta or 10000.0), {"rope_type": rope_type, **params}, partial


def refuse(source: str, hf_config: Any, setting: str) -> None:
    name = ", ".join(hf_config.architectures or []) or hf_config.model_type
    raise CheckpointError(f"{source}: a {name} with {setting} is not supported; folio loads "
                          f"{', '.join(SUPPORTED.values())} as they compute by default")


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: GPTConfig, kind: str
                       ) -> dict[str, torch.Tensor]:
    """A Llama-style state dict as folio's tensors (hf_rotary.layout, read backwards)."""
    state = {}
    for ours, pieces in hf_rotary.layout(config, kind).items():
        parts = [hf_rotary.flip_halves(hf_state[p.name].float(), p.flip_heads) for p in pieces]
        state[ours] = torch.cat(parts).contiguous()
    return state


# ---------------------------------------------------------------------------- where from

def local_source(name_or_path: str) -> str:
    """What transformers opens for `name_or_path`: a local dir or GPT-2 name as given, a hub
    id (owner/name) as its snapshot in the HF cache, downloaded there first if need be."""
    if (Path(name_or_path).expanduser().is_dir() or name_or_path in hf.GPT2_NAMES
            or not HUB_ID.fullmatch(name_or_path)):
        return name_or_path
    return str(hub_snapshot(name_or_path))


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model (config, weights, tokenizer files)."""
    hub = need("huggingface_hub", "hf", "init_from=<Hugging Face hub id>")
    try:  # the cache first: no network round trip when it is already here
        return Path(hub.snapshot_download(repo_id, allow_patterns=HUB_FILES,
                                          local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (huggingface_hub's error types vary)
        pass
    if not hf.hub_reachable():
        raise CheckpointError(f"init_from={repo_id!r} is neither an existing directory nor a "
                              "model in the Hugging Face cache, and the hub is unreachable; "
                              f"run `huggingface-cli download {repo_id}` where there is "
                              "network, or pass a local model directory")
    try:
        return Path(hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - a download failure has many types
        raise CheckpointError(f"cannot download {repo_id!r} from the Hugging Face hub "
                              f"({type(e).__name__}); check the id, or pass a local model "
                              "directory") from None


# ---------------------------------------------------------------------------- tokenizer

def tokenizer_spec(directory: Path, vocab_size: int) -> dict[str, Any]:
    """The tokenizer of a model dir: a folio char vocabulary (folio_vocab.json), GPT-2's BPE
    for a 50,257-token GPT-2, else the dir's tokenizer.json (`hf:DIR`)."""
    if (directory / hf.VOCAB_NOTE).is_file() or not (directory / TOKENIZER_FILE).is_file() \
            or (model_type(directory) == "gpt2" and vocab_size == hf.GPT2_VOCAB):
        return hf.tokenizer_spec(directory, vocab_size)
    return {"kind": "hf", "path": str(directory.expanduser().resolve())}


def model_type(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text("utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def check_dataset_tokenizer(directory: Path, kind: str, dataset: dict[str, Any]) -> None:
    """Refuse (one line) finetuning a model with its own tokenizer.json on a dataset
    tokenized otherwise (GPT-2 dirs keep folio's older rule: the vocabulary must fit)."""
    if kind == "gpt2" or (directory / hf.VOCAB_NOTE).is_file() \
            or not (directory / TOKENIZER_FILE).is_file():
        return
    theirs = Path(dataset.get("path", "")) / TOKENIZER_FILE
    same = dataset.get("kind") == "hf" and theirs.is_file() \
        and theirs.read_bytes() == (directory / TOKENIZER_FILE).read_bytes()
    if not same:
        raise DataError(f"the dataset was tokenized with {dataset.get('kind')!r}, not with "
                        f"{directory}'s own tokenizer; prepare it with `folio prepare ... "
                        f"--tokenizer=hf:{directory}`")
