"""`folio tokenizer eval DIR SOURCE`: how far a trained tokenizer compresses some text, in
bytes per token, beside GPT-2's BPE and the text's own characters on the same text (nanochat's
tok_eval). More bytes per token: longer contexts for the same block_size, fewer steps per
epoch; the model's bits per byte says whether it also predicts them well.
"""

from __future__ import annotations

from dataclasses import dataclass

from folio.config import TokenizerEvalConfig
from folio.data.texts import source_texts
from folio.data.tokenizer import BPETokenizer, GPT2Tokenizer
from folio.errors import DataError


@dataclass
class Compression:
    """One tokenizer on the text."""

    name: str
    vocab_size: int
    tokens: int
    bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


def evaluate_tokenizer(cfg: TokenizerEvalConfig) -> list[Compression]:
    """The trained tokenizer, GPT-2 and the characters on cfg.source; prints a table."""
    trained, gpt2 = BPETokenizer(cfg.tokenizer_dir), GPT2Tokenizer()
    texts = source_texts(cfg.source, text_field=cfg.text_field, split=cfg.split,
                         keep_newlines=cfg.keep_newlines, include=cfg.include,
                         exclude=cfg.exclude, max_chars=cfg.max_chars)
    tokens, alphabet = {"trained": 0, "gpt2": 0}, set()
    for block in texts:
        tokens["trained"] += len(trained.encode(block))
        tokens["gpt2"] += len(gpt2.encode(block))
        alphabet.update(block)
    n_bytes, n_chars = texts.counts["bytes"], texts.counts["characters"]
    if not n_chars:
        raise DataError(f"{texts.label} is empty; give a file with some text")
    rows = [Compression(cfg.tokenizer_dir, trained.vocab_size, tokens["trained"], n_bytes),
            Compression("gpt2", gpt2.vocab_size, tokens["gpt2"], n_bytes),
            Compression("char (this text's characters)", len(alphabet), n_chars, n_bytes)]
    print(format_table(rows, texts.label, n_chars))
    return rows


def format_table(rows: list[Compression], label: str, characters: int) -> str:
    """The rows side by side, each compared with GPT-2's (the second row)."""
    width = max(len(r.name) for r in rows)
    lines = [f"text: {label} ({rows[0].bytes:,} bytes, {characters:,} characters)",
             f"{'tokenizer':<{width}}  {'vocab':>9}  {'tokens':>13}  {'bytes/token':>11}  "
             "vs gpt2"]
    reference = rows[1].bytes_per_token
    for r in rows:
        change = f"{(r.bytes_per_token / reference - 1) * 100:+.1f}%" if r is not rows[1] else ""
        lines.append(f"{r.name:<{width}}  {r.vocab_size:>9,}  {r.tokens:>13,}  "
                     f"{r.bytes_per_token:>11.3f}  {change}".rstrip())
    return "\n".join(lines)
