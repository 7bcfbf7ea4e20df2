"""`folio export`: a run (folio or nanoGPT) written for the tools people run models with.

`--format hf`: a Hugging Face transformers directory with a standard class (GPT-2 for the
nanoGPT recipe; Apertus, Arcee, Llama or Qwen3 for rotary RMSNorm models) and the tokenizer.
`--format gguf`: one GGUF file for llama.cpp and Ollama, an Ollama Modelfile beside it.
Everything is checked before anything is written; the output is built beside the target and
renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from folio.config import ExportConfig
from folio.data import chat
from folio.errors import ConfigError
from folio.fsutil import atomic_dir, atomic_path
from folio.model.gpt import GPT
from folio.store import gguf_export, hf, hf_rotary, hf_tokenizer
from folio.store.sources import load_model

HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
MODELFILE = "Modelfile"


def to_hf_model(model: GPT, eot_id: int | None = None) -> Any:
    """The standard transformers model computing `model`'s logits: GPT-2 for the nanoGPT
    recipe, Apertus/Arcee/Llama/Qwen3 for rotary RMSNorm models; anything else is a one-line
    refusal."""
    cfg = model.config
    if cfg.rope or cfg.norm == "rmsnorm":
        return hf_rotary.to_hf_model(model, eot_id)
    return hf.to_hf_model(model, eot_id)


def export_hf(run_dir: str | Path, out_dir: str | Path, force: bool = False,
              dtype: str = "f32") -> Path:
    """Write run_dir's weights (in dtype) and tokenizer as a transformers model dir."""
    out_dir = Path(out_dir)
    if dtype not in HF_DTYPES:
        raise ConfigError(f"--dtype={dtype}: a Hugging Face export holds "
                          f"{', '.join(HF_DTYPES)} weights; {dtype} is a GGUF quantisation "
                          "(--format gguf)")
    check_target(out_dir, force)
    model, tokenizer, info = load_model(run_dir)
    template = None
    if info.chat_template is not None:
        chat.check_record(info.chat_template, f"{run_dir}/run.json")
        template = chat.JINJA
    hf_model = to_hf_model(model, tokenizer.eot_id)
    hf_model.to(getattr(torch, HF_DTYPES[dtype]))
    with atomic_dir(out_dir) as tmp:
        hf_model.save_pretrained(tmp)
        if hf_model.config.model_type in hf_rotary.CLASSES:
            hf_rotary.add_legacy_rope_keys(tmp / "config.json", model.config)
        hf_tokenizer.write_tokenizer(tmp, tokenizer, model.config.block_size, template)
    return out_dir


def export_gguf(run_dir: str | Path, out_file: str | Path, force: bool = False,
                dtype: str = "f32") -> Path:
    """Write run_dir as one GGUF file and an Ollama Modelfile beside it."""
    out_file = Path(out_file)
    modelfile = out_file.parent / MODELFILE
    if out_file.suffix != ".gguf":
        raise ConfigError(f"--format gguf writes one file: give its name, ending in .gguf, "
                          f"not {out_file}")
    for path in (out_file, modelfile):
        if path.is_dir():
            raise ConfigError(f"export target {path} is a directory; choose another file name")
        if path.exists() and not force:
            raise ConfigError(f"export target {path} exists; pass --force to replace it or "
                              "choose another file name")
    model, tokenizer, _ = load_model(run_dir)
    vocab = gguf_export.check(model, tokenizer)  # the refusals, before anything is written
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(modelfile) as tmp_modelfile, atomic_path(out_file) as tmp_gguf:
        gguf_export.write_gguf(model, vocab, Path(tmp_gguf), dtype, Path(run_dir).name)
        text = gguf_export.modelfile(out_file.name, vocab, model.config.block_size)
        Path(tmp_modelfile).write_text(text, encoding="utf-8")
    return out_file


def check_target(out: Path, force: bool) -> None:
    """Refuse (one line) a target that is a file, or a non-empty dir without --force."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export target {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"export target {out} is not empty; pass --force to replace it "
                          "or choose another directory")




def export(cfg: ExportConfig) -> Path:
    """`folio export`: write cfg.run_dir as cfg.format into cfg.out_dir and say so."""
    if cfg.format == "gguf":
        out = export_gguf(cfg.run_dir, cfg.out_dir, cfg.force, cfg.dtype)
        print(f"exported {cfg.run_dir} -> {out} ({cfg.dtype}) and {out.parent / MODELFILE}; "
              f"run it with `ollama create NAME -f {out.parent / MODELFILE}` or llama.cpp")
        return out
    out = export_hf(cfg.run_dir, cfg.out_dir, cfg.force, cfg.dtype)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {cfg.run_dir} -> {out} ({files})")
    return out
