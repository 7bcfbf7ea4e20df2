"""Local text sources: tiny Shakespeare (downloaded once, sha256-checked, cached) and your files:
.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, and directories and globs of any text files
(.md, .py, ...: text is told from binary by content; binary files are skipped and counted).

A source yields documents, each an iterator of raw text pieces (cleaning comes after).
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from folio.data.clean import decode_utf8
from folio.errors import DataError
from folio.extras import need
from folio.fsutil import atomic_open, cache_dir, sha256_file

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
PIECE_BYTES = 1 << 20  # how much of a file is read at a time
DOWNLOAD_TIMEOUT_S = 30
# Formats by file name ending; any other file named directly is read as text.
JSONL_FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst")
FORMATS = (".txt", *JSONL_FORMATS, ".parquet")
SNIFF_BYTES = 8192  # how much of a folder's file is read to tell text from binary


@dataclass
class Source:
    """Files read in order; a text file is one document, a .jsonl line or parquet row another."""

    label: str  # what meta.json records as "source"
    files: list[Path]
    text_field: str = "text"  # the field of a .jsonl record / column of a .parquet file
    skipped: list[Path] = field(default_factory=list)  # binary files of a folder or glob

    def documents(self) -> Iterator[Iterator[str]]:
        for path in self.files:
            kind = file_format(path)
            if kind == ".parquet":
                yield from (iter([text]) for text in read_parquet(path, self.text_field))
            elif kind in JSONL_FORMATS:
                yield from (iter([text]) for text in read_jsonl(path, self.text_field))
            else:
                yield read_text(path)

    def size(self) -> int:
        """Bytes on disk (compressed files count as stored)."""
        return sum(p.stat().st_size for p in self.files)


def file_format(path: Path) -> str:
    name = path.name.lower()
    return next((f for f in (*JSONL_FORMATS, ".parquet") if name.endswith(f)), ".txt")


def local_source(spec: str, text_field: str, include: list[str] | None = None,
                 exclude: list[str] | None = None) -> tuple[Source, str] | None:
    """(source, default name) for a path, directory or glob; None if `spec` names nothing.

    A directory or glob gives its files in name order, those matching `include` (any, if
    given) and no `exclude` glob; hidden files and folders are left out; text is told from
    binary by content (`is_text`), binary files are kept in `Source.skipped`."""
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                       if Path(p).is_file())
        if not paths:
            raise DataError(f"no files match {spec}; check the pattern (quote it in the shell)")
        parent = Path(spec)
        while glob.has_magic(str(parent)):
            parent = parent.parent
        files, skipped = _text_files(paths, parent, include or [], exclude or [])
        _check_some(files, skipped, f"no text files match {spec}")
        return Source(spec, files, text_field, skipped), parent.resolve().name or "corpus"
    path = Path(spec).expanduser()
    if not path.exists():
        return None
    if path.is_dir():
        files, skipped = _text_files(_walk(path), path, include or [], exclude or [])
        _check_some(files, skipped, f"directory {path} has no text files")
        return Source(str(path.resolve()), files, text_field, skipped), path.resolve().name
    stem = path.name[:-len(file_format(path))] if file_format(path) != ".txt" else path.stem
    return Source(str(path.resolve()), [path], text_field), stem


def _walk(root: Path) -> list[Path]:
    """Every file under `root` in name order, hidden files and folders (.git) left out."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / n for n in names if not n.startswith("."))
    return sorted(found)


def _text_files(paths: list[Path], root: Path, include: list[str], exclude: list[str]
                ) -> tuple[list[Path], list[Path]]:
    """(text files, binary files) among `paths` that the globs select (matched against the
    path below `root` and against the file name)."""
    def matches(path: Path, patterns: list[str]) -> bool:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(path.name, p) for p in patterns)

    text, binary = [], []
    for path in paths:
        if (include and not matches(path, include)) or matches(path, exclude):
            continue
        known = path.name.lower().endswith(FORMATS)  # by name; .txt must then be UTF-8
        (text if known or is_text(path) else binary).append(path)
    return text, binary


def _check_some(files: list[Path], skipped: list[Path], what: str) -> None:
    if not files:
        binary = f" ({len(skipped)} binary file(s) skipped)" if skipped else ""
        raise DataError(f"{what}{binary}; give a folder of text files (.txt, .md, .py, "
                        ".jsonl, ...) or a file, and check --include / --exclude")


def is_text(path: Path) -> bool:
    """Whether a file holds text, by content: its first SNIFF_BYTES bytes have no NUL byte and
    are UTF-8 (a character cut at the end of a longer file allowed). A file in another
    encoding (Latin-1, UTF-16) or unreadable counts as binary."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(head,
                                                               final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------- readers

def read_text(path: Path) -> Iterator[str]:
    """A text file's contents in pieces; invalid UTF-8 is an error naming the byte offset."""
    with open_binary(path) as f:
        yield from decode_utf8(iter(lambda: f.read(PIECE_BYTES), b""), str(path))


def read_jsonl(path: Path, field: str) -> Iterator[str]:
    """The `field` string of each line of a .jsonl[.gz|.zst] file; blank lines are skipped."""
    compressed = " (decompressed)" if file_format(path) != ".jsonl" else ""
    with open_binary(path) as f:
        offset = 0  # of the current line
        for number, raw in enumerate(_lines(f, path), start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where} is not UTF-8: invalid byte at offset {start + e.start}"
                                f"{compressed}; convert the file to UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg}); each line must be an "
                                f'object like {{"{field}": "..."}}') from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f'{where} has no string "{field}" field; each line must be an '
                                f'object like {{"{field}": "..."}} (or pass --text_field=NAME)')
            yield record[field]


def read_parquet(path: Path, field: str) -> Iterator[str]:
    """The `field` column of a .parquet file, row by row, read in record batches."""
    pq = need("pyarrow.parquet", "datasets", f"reading {path}", "pyarrow")
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if field not in names:
            raise DataError(f'{path} has no column "{field}" (columns: {", ".join(names)}); '
                            "pass --text_field=NAME")
        for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
            for number, text in enumerate(batch.column(0).to_pylist()):
                if not isinstance(text, str):
                    raise DataError(f'{path}: column "{field}" holds {type(text).__name__} '
                                    f"(row {number} of a batch), not text; pass --text_field")
                yield text
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read {path} as parquet ({e})") from None


def _lines(f: BinaryIO, path: Path) -> Iterator[bytes]:
    """Lines of a (maybe compressed) file; a corrupt compressed stream is a DataError."""
    try:
        yield from f
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}; the file is corrupt or truncated") from None
    except Exception as e:  # zstandard.ZstdError is not an OSError
        if type(e).__name__ != "ZstdError":
            raise
        raise DataError(f"cannot read {path}: {e}; the file is corrupt or truncated") from None


@contextlib.contextmanager
def open_binary(path: Path) -> Iterator[BinaryIO]:
    """A file opened for reading bytes, decompressing .gz and .zst."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    with raw:
        name = path.name.lower()
        if name.endswith(".gz"):
            with gzip.open(raw, "rb") as f:
                yield f
        elif name.endswith(".zst"):
            zstandard = need("zstandard", "datasets", f"reading {path}")
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
            with io.BufferedReader(stream, PIECE_BYTES) as f:
                yield f
        else:
            yield raw


# ---------------------------------------------------------------------------- tiny Shakespeare

def tiny_shakespeare(source: str = "") -> Source:
    """Tiny Shakespeare, sha256-verified: from --source, else the cache, else downloaded."""
    cached = cache_dir() / "tinyshakespeare" / "input.txt"
    if source and "://" not in source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"--source {source} does not exist; give tiny Shakespeare's "
                            "input.txt or a URL")
        _check_sha256(path, sha256_file(path), f"to prepare your own text run `folio prepare "
                                                f"{source}`")
        return Source(str(path.resolve()), [path])
    url = source or SHAKESPEARE_URL
    if not source and cached.is_file():
        if sha256_file(cached) == SHAKESPEARE_SHA256:
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


def _check_sha256(path: Path, actual: str, fix: str) -> None:
    if actual != SHAKESPEARE_SHA256:
        raise DataError(f"{path} is not tiny Shakespeare (sha256 {actual[:16]}..., expected "
                        f"{SHAKESPEARE_SHA256[:16]}...); {fix}")
