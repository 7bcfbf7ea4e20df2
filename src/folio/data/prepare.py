"""`folio prepare`: text (tiny Shakespeare, or your .txt / directory / .jsonl) -> token files.

Writes `<data_dir>/<name>/{train.bin, val.bin, meta.json}` atomically. The first
(1 - val_fraction) of the characters is train, the rest val, as in nanoGPT. Text is read and
encoded in ~1 MB pieces, so memory stays bounded for inputs of any size.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from folio.config import AUTO, PrepareConfig, nearest_key
from folio.data.tokenizer import (
    META_FORMAT_VERSION,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    read_meta,
)
from folio.errors import DataError
from folio.fsutil import atomic_open, atomic_write_json, cache_dir

__all__ = ["prepare", "read_meta", "cache_dir", "KNOWN_DATASETS"]

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
KNOWN_DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}  # name -> tokenizer
DOC_SEPARATOR = "\n\n"  # between the files of a directory and the records of a .jsonl
PIECE_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 30
# Where a BPE piece may end: before " X" or after "\nX" that follow a non-space character.
# GPT-2's pre-tokenizer always splits there, so encoding piece by piece equals encoding the
# whole text (a cut before "\n" or inside a run of spaces would not).
SAFE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")


@dataclass
class Source:
    """Where the text comes from: files read as one text, documents joined by DOC_SEPARATOR."""

    label: str  # what meta.json records as "source"
    files: list[Path]
    jsonl: bool = False

    def pieces(self) -> Iterator[str]:
        """The whole text, in pieces of about PIECE_BYTES."""
        any_text = False
        for document in self._documents():
            for i, piece in enumerate(p for p in document if p):
                if i == 0 and any_text:
                    yield DOC_SEPARATOR
                any_text = True
                yield piece

    def _documents(self) -> Iterator[Iterator[str]]:
        for path in self.files:
            if self.jsonl:
                yield from (iter([text]) for text in _read_jsonl(path))
            else:
                yield _read_utf8(path)

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)


# ---------------------------------------------------------------------------- prepare

def prepare(cfg: PrepareConfig) -> Path:
    """Tokenize the configured dataset; returns the dataset directory."""
    source, default_tokenizer, default_name = resolve_source(cfg)
    name = cfg.name or default_name
    if not name or Path(name).name != name or name in (".", ".."):
        raise DataError(f"--name {name!r} must be a plain directory name, e.g. --name=mytext")

    n_chars, digest, chars = scan(source)
    split_at = int(n_chars * (1 - cfg.val_fraction))  # nanoGPT: data[:int(n*0.9)]
    if split_at == 0 or split_at == n_chars:
        raise DataError(f"{source.label} has only {n_chars} characters: too short for a "
                        f"non-empty train and val split at val_fraction={cfg.val_fraction}")
    kind = default_tokenizer if cfg.tokenizer == AUTO else cfg.tokenizer
    tokenizer: Tokenizer = CharTokenizer(chars) if kind == "char" else GPT2Tokenizer()
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32

    out = Path(cfg.data_dir) / name
    with _cleanup_new_dirs(out):
        train_tokens, val_tokens = write_splits(source, tokenizer, split_at, n_chars, out, dtype)
        atomic_write_json(out / "meta.json", {
            "format_version": META_FORMAT_VERSION,
            "name": name,
            "tokenizer": tokenizer.spec(),
            "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size,
            "train_tokens": train_tokens,
            "val_tokens": val_tokens,
            "characters": n_chars,
            "val_fraction": cfg.val_fraction,
            "source": source.label,
            "source_sha256": digest,
        })
    print(f"length of dataset in characters: {n_chars:,}\n"
          f"vocab size: {tokenizer.vocab_size:,} ({tokenizer.kind})\n"
          f"train has {train_tokens:,} tokens\n"
          f"val has {val_tokens:,} tokens\n"
          f"wrote {out}/ (train.bin, val.bin, meta.json)")
    return out


def scan(source: Source) -> tuple[int, str, list[str]]:
    """First pass: character count, sha256 of the UTF-8 text, and its distinct characters."""
    n, sha, chars = 0, hashlib.sha256(), set()
    with _progress(source.size(), "reading", "B") as bar:
        for piece in source.pieces():
            data = piece.encode("utf-8", "surrogatepass")
            n += len(piece)
            sha.update(data)
            chars.update(piece)
            bar.update(len(data))
    if n == 0:
        raise DataError(f"{source.label} is empty; give a file with some text")
    return n, sha.hexdigest(), sorted(chars)


def write_splits(source: Source, tokenizer: Tokenizer, split_at: int, n_chars: int, out: Path,
                 dtype: type) -> tuple[int, int]:
    """Second pass: encode train and val text in pieces straight into the two .bin files."""
    counts = [0, 0]
    with atomic_open(out / "train.bin") as train, atomic_open(out / "val.bin") as val, \
            _progress(n_chars, "encoding", "char") as bar:
        files = (train, val)
        for split, text in _bpe_pieces(_split(source.pieces(), split_at), tokenizer.kind):
            ids = tokenizer.encode_array(text, dtype)
            files[split].write(ids.tobytes())
            counts[split] += len(ids)
            bar.update(len(text))
        # An old meta.json must not describe the new .bin files if we stop right here.
        (out / "meta.json").unlink(missing_ok=True)
    return counts[0], counts[1]


def _split(pieces: Iterator[str], split_at: int) -> Iterator[tuple[int, str]]:
    """(0, text) for characters before split_at, (1, text) after."""
    pos = 0
    for piece in pieces:
        end = pos + len(piece)
        if pos < split_at < end:
            yield 0, piece[:split_at - pos]
            yield 1, piece[split_at - pos:]
        else:
            yield (0 if end <= split_at else 1), piece
        pos = end


def _bpe_pieces(pieces: Iterator[tuple[int, str]], kind: str) -> Iterator[tuple[int, str]]:
    """For BPE, re-cut pieces at SAFE_CUT points (a char tokenizer can cut anywhere)."""
    if kind == "char":
        yield from pieces
        return
    buffer, current = "", 0
    for split, piece in pieces:
        if split != current:  # each split is encoded as its own text, like nanoGPT
            if buffer:
                yield current, buffer
            buffer, current = "", split
        buffer += piece
        if len(buffer) >= PIECE_BYTES:
            tail = max(len(buffer) - (1 << 16), 0)
            cut = max((m.start() for m in SAFE_CUT.finditer(buffer, tail)), default=0)
            if cut or len(buffer) >= 16 * PIECE_BYTES:  # no safe cut in 16 MB: cut anyway
                cut = cut or len(buffer)
                yield current, buffer[:cut]
                buffer = buffer[cut:]
    if buffer:
        yield current, buffer


# ---------------------------------------------------------------------------- sources

def resolve_source(cfg: PrepareConfig) -> tuple[Source, str, str]:
    """(source, default tokenizer, default name) for the dataset argument."""
    dataset = cfg.dataset
    if dataset in KNOWN_DATASETS:
        return tiny_shakespeare(cfg.source), KNOWN_DATASETS[dataset], dataset
    if cfg.source:
        raise DataError(f"--source only applies to {' and '.join(KNOWN_DATASETS)}; to prepare "
                        f"{cfg.source} run `folio prepare {cfg.source}`")
    path = Path(dataset).expanduser()
    if not path.exists():
        looks_like_path = os.sep in dataset or "/" in dataset or path.suffix != ""
        if looks_like_path:
            raise DataError(f"{dataset} does not exist; give a .txt file, a directory of .txt "
                            "files or a .jsonl file")
        hint = nearest_key(dataset, list(KNOWN_DATASETS)).replace("--", "")
        raise DataError(f"unknown dataset {dataset!r}{hint} (known: "
                        f"{', '.join(KNOWN_DATASETS)}; or give the path of a .txt file, a "
                        "directory or a .jsonl file)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"directory {path} has no .txt files")
        return Source(str(path.resolve()), files), "char", path.resolve().name
    return Source(str(path.resolve()), [path], path.suffix == ".jsonl"), "char", path.stem


def tiny_shakespeare(source: str = "") -> Source:
    """Tiny Shakespeare, sha256-verified: from --source, else the cache, else downloaded."""
    cached = cache_dir() / "tinyshakespeare" / "input.txt"
    if source and "://" not in source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"--source {source} does not exist; give tiny Shakespeare's "
                            "input.txt or a URL")
        _check_sha256(path, _sha256(path), f"to prepare your own text run `folio prepare "
                                            f"{source}`")
        return Source(str(path.resolve()), [path])
    url = source or SHAKESPEARE_URL
    if not source and cached.is_file():
        if _sha256(cached) == SHAKESPEARE_SHA256:
            return Source(url, [cached])
        print(f"cached copy {cached} is corrupt (sha256 mismatch); downloading it again")
    download(url, cached, SHAKESPEARE_SHA256)
    return Source(url, [cached])


def download(url: str, dest: Path, sha256: str) -> None:
    """Fetch `url` into `dest` atomically; keep it only if its sha256 matches."""
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                atomic_open(dest) as f:
            sha = hashlib.sha256()
            while block := response.read(PIECE_BYTES):
                sha.update(block)
                f.write(block)
            if sha.hexdigest() != sha256:
                raise DataError(f"download from {url} is corrupt: sha256 {sha.hexdigest()}, "
                                f"expected {sha256}; nothing was kept, try again")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {url} ({reason}); download it yourself and save it "
                        f"as {dest}") from None


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(PIECE_BYTES):
            sha.update(block)
    return sha.hexdigest()


def _check_sha256(path: Path, actual: str, fix: str) -> None:
    if actual != SHAKESPEARE_SHA256:
        raise DataError(f"{path} is not tiny Shakespeare (sha256 {actual[:16]}..., expected "
                        f"{SHAKESPEARE_SHA256[:16]}...); {fix}")


def _read_utf8(path: Path) -> Iterator[str]:
    """A file's text in pieces; invalid UTF-8 is an error naming the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes of the file read so far
    with _open(path) as f:
        while True:
            block = f.read(PIECE_BYTES)
            pending = len(decoder.getstate()[0])
            try:
                yield decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text: invalid byte at offset "
                                f"{offset - pending + e.start}; convert it to UTF-8 "
                                "(e.g. iconv -t UTF-8)") from None
            if not block:
                return
            offset += len(block)


def _read_jsonl(path: Path) -> Iterator[str]:
    """The "text" field of each line of a .jsonl file; blank lines are skipped."""
    with _open(path) as f:
        offset = 0  # of the current line
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where} is not UTF-8: invalid byte at offset "
                                f"{start + e.start}; convert the file to UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg}); each line must be an "
                                'object like {"text": "..."}') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{where} has no string "text" field; each line must be an '
                                'object like {"text": "..."}')
            yield record["text"]


@contextlib.contextmanager
def _open(path: Path) -> Iterator:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    with f:
        yield f


@contextlib.contextmanager
def _cleanup_new_dirs(path: Path) -> Iterator[None]:
    """Create `path` (and parents); on failure remove the directories this created."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException as e:
        for p in created:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(e, OSError):
            raise DataError(f"cannot write the dataset to {path}: {e.strerror or e}; choose a "
                            "writable --data_dir") from None
        raise


def _progress(total: int, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr when it is a terminal; a silent stand-in otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                disable=not sys.stderr.isatty(), leave=False)
