"""`folio tokenizer train`: a byte-level BPE trained on your text, saved as a tokenizer dir.

The trainer is rustbpe (nanochat's): on 100 MB of text it needed 2.3x less CPU time than
Hugging Face `tokenizers`' trainer for the same merges (benchmarks/tokenizer_trainers.py),
and its ranks are what tiktoken encodes with. The text streams through in blocks (texts.py):
memory grows with the distinct pieces of the text, not its size.
"""

from __future__ import annotations

import time
from pathlib import Path

from folio.config import TokenizerTrainConfig
from folio.data import bpe_files
from folio.data.texts import source_texts
from folio.data.tokenizer import BPETokenizer
from folio.errors import ConfigError, DataError
from folio.extras import need
from folio.fsutil import atomic_dir

BUFFER_BLOCKS = 64  # blocks rustbpe takes at a time (parallel over the cores): ~4M characters


def default_out(name: str, vocab_size: int) -> Path:
    return Path("tokenizers") / f"{name}-{vocab_size}"


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train on cfg.source and write the tokenizer dir (atomically); returns its path."""
    rustbpe = need("rustbpe", "tokenizer", "folio tokenizer train")
    specials = bpe_files.SPECIAL_TOKENS
    merged = cfg.vocab_size - len(specials)  # the byte tokens and the merges
    out = Path(cfg.out) if cfg.out else None
    if out is not None:
        check_out(out, cfg.overwrite)
    texts = source_texts(cfg.source, text_field=cfg.text_field, split=cfg.split,
                         keep_newlines=cfg.keep_newlines, include=cfg.include,
                         exclude=cfg.exclude, max_chars=cfg.max_chars)
    out = out or default_out(texts.name, cfg.vocab_size)
    check_out(out, cfg.overwrite)
    print(f"training a {cfg.vocab_size:,}-token byte-level BPE ({cfg.pattern} split pattern, "
          f"{len(specials)} special tokens) on {texts.label}", flush=True)
    started, cpu = time.perf_counter(), time.process_time()
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size=merged, buffer_size=BUFFER_BLOCKS,
                                pattern=bpe_files.PATTERNS[cfg.pattern])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if texts.counts["characters"] == 0:
        raise DataError(f"{texts.label} is empty; give a file with some text")
    if trainer.vocab_size < merged:
        raise DataError(f"{texts.label} is too small for vocab_size={cfg.vocab_size:,}: its "
                        f"{texts.counts['bytes']:,} bytes give only {trainer.vocab_size - 256:,}"
                        f" merges of the {merged - 256:,} asked for; give more text or a "
                        f"smaller --vocab_size (at most {trainer.vocab_size + len(specials):,})")
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    special_ids = {token: len(ranks) + i for i, token in enumerate(specials)}
    info = {"trainer": f"rustbpe {_version('rustbpe')}", "pattern_name": cfg.pattern,
            "source": texts.label, "trained_on": dict(texts.counts),
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "settings": {"keep_newlines": cfg.keep_newlines, "text_field": cfg.text_field,
                         "include": cfg.include, "exclude": cfg.exclude,
                         "max_chars": cfg.max_chars}}
    with atomic_dir(out) as tmp:
        bpe_files.write(tmp, ranks, special_ids, bpe_files.PATTERNS[cfg.pattern], info)
    tokenizer = BPETokenizer(str(out))
    print(f"trained on {texts.counts['bytes']:,} bytes in {seconds:.1f}s ({cpu:.1f}s CPU); wrote "
          f"{out}/ ({bpe_files.TOKENIZER_FILE}, {bpe_files.INFO_FILE}): {tokenizer.vocab_size:,} "
          f"tokens, end of text = {tokenizer.eot_id}. Use it with: folio prepare "
          f"{cfg.source} --tokenizer={out}", flush=True)
    return out


def check_out(out: Path, overwrite: bool) -> None:
    """The output directory may be new or empty; a tokenizer dir is replaced when asked to,
    any other directory never."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / bpe_files.INFO_FILE).is_file():
        raise ConfigError(f"--out {out} is a directory with other files in it; give a new or "
                          "empty directory")
    if not overwrite:
        raise ConfigError(f"--out {out} holds a tokenizer already; pass --overwrite=True to "
                          "replace it or choose another directory")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
