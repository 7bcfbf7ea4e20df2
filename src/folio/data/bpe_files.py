"""The directory `folio tokenizer train` writes: `tokenizer.json`, a byte-level BPE in Hugging
Face's format (`tokenizers` and transformers load it as it is), and `folio_tokenizer.json`,
what folio records about it (split pattern, special tokens, how it was trained, and the
sha256 of tokenizer.json that datasets and runs prepared with it refer to).

The merges are stored as tiktoken ranks are: token id = merge order, the 256 single bytes
first (in byte order), the special tokens last.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from folio.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "folio_tokenizer.json"
FORMAT_VERSION = 1
# GPT-4's (cl100k) split pattern: case-insensitive contractions, letters with one leading
# non-letter, numbers of up to 3 digits, punctuation runs, newlines, spaces
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}
# end of text first (the token between documents), then the roles a chat fine-tune needs
SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


@dataclass
class BPEFiles:
    """What a tokenizer directory holds."""

    ranks: dict[bytes, int]  # every token's bytes -> its id (its merge order)
    special_tokens: dict[str, int]
    pattern: str
    info: dict[str, Any]  # folio_tokenizer.json
    sha256: str  # of tokenizer.json

    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(self.special_tokens)


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte, in GPT-2's order of the 256 bytes:
    printable bytes stand for themselves, the others for chr(256 + n). Hugging Face's
    byte-level tokenizers (tokenizer.json) write their tokens in it."""
    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    alphabet = {chr(b): b for b in order}
    for n, b in enumerate(b for b in range(256) if b not in set(order)):
        alphabet[chr(256 + n)] = b
    return alphabet


def byte_to_char() -> dict[int, str]:
    """The byte-level alphabet the other way: byte -> its character."""
    return {b: c for c, b in byte_level_alphabet().items()}


def merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order: the two parts its bytes
    become when merged with the lower ranks only (how tiktoken's ranks map to merges)."""
    out, whole_only = rank_merges(ranks)
    if whole_only:
        token = whole_only[0]
        raise ValueError(f"token {token!r} (rank {ranks[token]}) is not one merge of lower ranks")
    return out


def rank_merges(ranks: dict[bytes, int]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """(the merges of `merges`, the multi-byte tokens no merge of lower ranks makes): tiktoken
    reaches the latter only when a whole pre-tokenized piece is one of them."""
    out, whole_only = [], []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = bpe_parts(ranks, token, rank)
        if len(parts) == 2:
            out.append((parts[0], parts[1]))
        else:
            whole_only.append(token)
    return out, whole_only


def bpe_parts(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """What tiktoken's merging makes of `token`'s bytes using only ranks below `below`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        rank, i = min((ranks.get(parts[i] + parts[i + 1], below), i)
                      for i in range(len(parts) - 1))
        if rank >= below:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_json(ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str
                   ) -> dict[str, Any]:
    """tokenizer.json's contents: Hugging Face byte-level BPE with these ranks as ids, the
    split pattern, whole pieces found in the vocabulary kept whole (as tiktoken does)."""
    alphabet = byte_to_char()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in special_tokens.items()]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(t): i for t, i in sorted(ranks.items(), key=lambda x: x[1])},
                  "merges": [[text(a), text(b)] for a, b in merges(ranks)]},
    }


def write(directory: Path, ranks: dict[bytes, int], special_tokens: dict[str, int],
          pattern: str, info: dict[str, Any]) -> str:
    """Write both files into `directory` (a fresh temporary one: the caller renames it into
    place); returns tokenizer.json's sha256."""
    data = json.dumps(tokenizer_json(ranks, special_tokens, pattern), ensure_ascii=False)
    raw = data.encode("utf-8")
    (directory / TOKENIZER_FILE).write_bytes(raw)
    sha = hashlib.sha256(raw).hexdigest()
    record = {"format_version": FORMAT_VERSION, "kind": "bpe",
              "vocab_size": len(ranks) + len(special_tokens), "pattern": pattern,
              "special_tokens": special_tokens, "tokenizer_sha256": sha, **info}
    (directory / INFO_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n",
                                       "utf-8")
    return sha


def read(directory: str | Path) -> BPEFiles:
    """A tokenizer directory, checked; anything wrong is a one-line DataError."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise DataError(f"tokenizer dir {path} does not exist; train one with `folio tokenizer "
                        "train SOURCE --vocab_size=N --out DIR`")
    info_file, tok_file = path / INFO_FILE, path / TOKENIZER_FILE
    if not info_file.is_file() or not tok_file.is_file():
        raise DataError(f"{path} is not a tokenizer dir of `folio tokenizer train` (it needs "
                        f"{TOKENIZER_FILE} and {INFO_FILE}); for another Hugging Face "
                        f"tokenizer use --tokenizer=hf:{path}")
    try:
        raw = tok_file.read_bytes()
        info = json.loads(info_file.read_text("utf-8"))
        model = json.loads(raw)["model"]
        char_to_byte = byte_level_alphabet()
        ranks = {bytes(char_to_byte[c] for c in t): i for t, i in model["vocab"].items()}
        specials = {str(t): int(i) for t, i in info["special_tokens"].items()}
        pattern = str(info["pattern"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} holds a damaged tokenizer ({type(e).__name__}: {e}); train it "
                        "again") from None
    sha = hashlib.sha256(raw).hexdigest()
    if info.get("format_version") != FORMAT_VERSION or info.get("tokenizer_sha256") != sha:
        raise DataError(f"{tok_file} does not match {info_file.name} (changed since it was "
                        "trained?); train the tokenizer again")
    ids = sorted([*ranks.values(), *specials.values()])
    if ids != list(range(len(ids))) or len(ranks) < 256:
        raise DataError(f"{tok_file} does not number its tokens 0..{len(ids) - 1} with every "
                        "byte among them; train the tokenizer again")
    return BPEFiles(ranks, specials, pattern, info, sha)
