"""`folio export`: a run (folio or nanoGPT) written as a Hugging Face transformers GPT-2 dir.

The directory is built beside the target and renamed into place, so a failed export leaves
nothing half-written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from folio.config import ExportConfig
from folio.data.bpe_files import TOKENIZER_FILE
from folio.data.tokenizer import gpt2_vocab_file
from folio.errors import ConfigError
from folio.fsutil import atomic_dir
from folio.store import hf
from folio.store.sources import load_model


def export_hf(run_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write run_dir's weights (and tokenizer, or a vocab note) as a transformers model dir."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    model, tokenizer, _ = load_model(run_dir)
    with atomic_dir(out_dir) as tmp:
        hf.to_hf_model(model, tokenizer.eot_id).save_pretrained(tmp)
        if tokenizer.kind == "gpt2":
            _write_gpt2_tokenizer(tmp, model.config.block_size)
        elif tokenizer.kind == "bpe":
            _write_trained_tokenizer(tmp, tokenizer, model.config.block_size)
        else:
            _write_vocab_note(tmp, tokenizer, run_dir)
    return out_dir


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"export target {out_dir} is a file; pass a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"export target {out_dir} is not empty; pass --force to replace it "
                          "or choose another directory")


def _write_gpt2_tokenizer(directory: Path, max_length: int) -> None:
    """OpenAI's GPT-2 BPE files as vocab.json/merges.txt, plus transformers' tokenizer files."""
    for name, hf_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        (directory / hf_name).write_bytes(gpt2_vocab_file(name))
    transformers = hf.transformers_module()
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(directory), local_files_only=True,
                                                         model_max_length=max_length)
    tok.save_pretrained(str(directory))


def _write_trained_tokenizer(directory: Path, tokenizer: Any, max_length: int) -> None:
    """A tokenizer `folio tokenizer train` wrote, as transformers' fast tokenizer files (its
    tokenizer.json as it is, its end of text as the eos token)."""
    transformers = hf.transformers_module()
    eot = next(t for t, i in tokenizer.special_tokens.items() if i == tokenizer.eot_id)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(Path(tokenizer.path) / TOKENIZER_FILE), eos_token=eot,
        bos_token=eot, model_max_length=max_length)
    tok.save_pretrained(str(directory))


def _write_vocab_note(directory: Path, tokenizer: Any, run_dir: str | Path) -> None:
    """Char-level models have no transformers tokenizer: describe the vocabulary instead."""
    spec = tokenizer.spec()
    note = {"format_version": 1, "tokenizer": spec,
            "usage": "token id i is the character chars[i]; encode text by mapping each "
                     "character to its index (AutoTokenizer cannot load this vocabulary)"}
    (directory / hf.VOCAB_NOTE).write_text(json.dumps(note, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    (directory / "README.md").write_text(
        f"# Character-level GPT-2 exported by folio from `{run_dir}`\n\n"
        "Load the weights with `transformers.AutoModelForCausalLM.from_pretrained(dir)`.\n"
        f"The vocabulary is {len(spec.get('chars', []))} characters, listed in "
        f"`{hf.VOCAB_NOTE}`: token id `i` is `chars[i]`.\n"
        "`AutoTokenizer` does not work for this model; encode/decode with that list:\n\n"
        "```python\nimport json\nchars = json.load(open('folio_vocab.json'))['tokenizer']"
        "['chars']\nstoi = {c: i for i, c in enumerate(chars)}\n"
        "ids = [stoi[c] for c in 'To be']\ntext = ''.join(chars[i] for i in ids)\n```\n",
        encoding="utf-8")


def export(cfg: ExportConfig) -> Path:
    """`folio export`: write cfg.run_dir as cfg.format (hf) into cfg.out_dir and say so."""
    out = export_hf(cfg.run_dir, cfg.out_dir, force=cfg.force)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {cfg.run_dir} -> {out} ({files})")
    if (out / hf.VOCAB_NOTE).is_file():
        print(f"character-level vocabulary: see {out / hf.VOCAB_NOTE} (AutoTokenizer cannot "
              "load it)")
    return out
