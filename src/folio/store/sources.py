"""Every place a model can come from, opened the same way: a folio run dir, a nanoGPT out dir
(ckpt.pt), or a Hugging Face dir (config.json: GPT-2, Llama, Qwen3, Apertus, Arcee). All end in
weights.gpt_from_state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from folio.data.tokenizer import tokenizer_from_spec
from folio.errors import CheckpointError
from folio.model.gpt import GPT, GPTConfig
from folio.store import checkpoint, hf_import, nanogpt, rundir
from folio.store.checkpoint import ResumeState
from folio.store.rundir import RUN_INFO, RunInfo
from folio.store.weights import gpt_from_state

HF_CONFIG = "config.json"


def kind_of(path: Path) -> str:
    """"folio", "nanogpt" or "hf": which reader opens `path` (run.json wins over the others)."""
    if rundir.is_nanogpt_dir(path):
        return "nanogpt"
    if not (path / RUN_INFO).exists() and (path / HF_CONFIG).is_file():
        return "hf"
    return "folio"


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[GPT, Any, RunInfo]:
    """(model in eval mode, tokenizer, run info) from any supported source."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "nanogpt":
        model, tokenizer, info, _ = nanogpt.read_nanogpt_out_dir(path)
    elif kind == "hf":
        model, tokenizer, info = _read_hf_dir(path)
    else:
        info = rundir.read_run_info(path)
        tensors, source = checkpoint.read_model_weights(path)
        model = gpt_from_state(model_config(info, path), tensors, source)
        tokenizer = tokenizer_from_spec(info.tokenizer)
    return model.to(device).eval(), tokenizer, info


def load_resume(out_dir: str | Path) -> tuple[ResumeState, RunInfo]:
    """What `init_from=resume` continues: a folio run dir's resume state, or a nanoGPT one's."""
    out_dir = Path(out_dir)
    if rundir.is_nanogpt_dir(out_dir):
        return nanogpt.resume_state_from_nanogpt(out_dir)
    if not out_dir.is_dir():
        raise CheckpointError(f"--init_from=resume but {out_dir} does not exist; pass the "
                              "--out_dir of the run to continue, or start with "
                              "--init_from=scratch")
    info = rundir.read_run_info(out_dir)
    return checkpoint.load_resume(out_dir), info


def model_config(info: RunInfo, run_dir: Path, **changes: Any) -> GPTConfig:
    """The GPTConfig run.json describes (with `changes`, e.g. another dropout)."""
    try:
        return GPTConfig(**{**info.model, **changes})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / RUN_INFO} has a bad model section ({e})") from None


def _read_hf_dir(path: Path) -> tuple[GPT, Any, RunInfo]:
    model = hf_import.load_pretrained(str(path))
    spec = hf_import.tokenizer_spec(path, model.config.vocab_size)
    info = RunInfo(model=model.config.to_dict(), n_params=model.num_params(), tokenizer=spec,
                   source="hf", imported_from={"hf": str(path)})
    return model, tokenizer_from_spec(spec), info


def load_for_training(path: str | Path, dropout: float,
                      dataset_tokenizer: dict[str, Any] | None = None
                      ) -> tuple[GPT, dict[str, Any] | None]:
    """The weights a run finetunes (`--init_from`): a folio run dir's best weights, a Hugging
    Face dir, hub id or GPT-2 name (a dataset of another tokenizer refused), with `dropout`;
    and the tokenizer spec of a run dir (None for the others: `tokenizer_of` finds theirs)."""
    path = Path(path)
    kind = kind_of(path) if path.is_dir() else "hf"
    if kind == "hf":
        return hf_import.load_pretrained(str(path), dropout, dataset_tokenizer), None
    if kind == "nanogpt":
        raise CheckpointError(f"--init_from={path} is a nanoGPT out dir; convert it first with "
                              f"`folio import-nanogpt {path} RUN_DIR`, then --init_from=RUN_DIR")
    info = rundir.read_run_info(path)
    tensors, source = checkpoint.read_model_weights(path)
    model = gpt_from_state(model_config(info, path, dropout=dropout), tensors, source)
    return model, info.tokenizer


def tokenizer_of(init_from: str, vocab_size: int) -> dict[str, Any]:
    """The tokenizer spec of a Hugging Face dir (folio's char note, or GPT-2's) or name."""
    path = Path(init_from)
    return hf_import.tokenizer_spec(path, vocab_size) if path.is_dir() else {"kind": "gpt2"}
