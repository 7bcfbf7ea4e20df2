"""`folio prepare`: a corpus -> `<data_dir>/<name>/{train.bin, val.bin, meta.json}`.

sources.py and hub.py read documents, clean.py normalises them, layout.py turns them into
chunks, encode.py tokenizes the chunks on all cores and writer.py writes the token files,
resumably, finishing atomically. Memory stays bounded for inputs of any size.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from folio.config import AUTO, PrepareConfig, nearest_key
from folio.data import layout
from folio.data.clean import Cleaner
from folio.data.encode import available_cores, encode_chunks
from folio.data.hub import RECIPES, HubSource, hub_source
from folio.data.progress import Progress
from folio.data.sources import (
    SHAKESPEARE_SHA256,
    Source,
    cache_dir,
    local_source,
    tiny_shakespeare,
)
from folio.data.tokenizer import META_FORMAT_VERSION, Tokenizer, make_tokenizer, read_meta
from folio.data.writer import TokenWriter
from folio.errors import DataError

__all__ = ["prepare", "read_meta", "cache_dir", "KNOWN_DATASETS", "SHAKESPEARE_SHA256"]

KNOWN_DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}  # name -> tokenizer
DEFAULT_VAL_FRACTION = 0.1
MIN_CHUNKS_PER_WORKER = 2  # with num_proc=0, smaller inputs are encoded in this process


@dataclass
class Scan:
    """What a first pass over a local source learns."""

    chars: int
    documents: int
    sha256: str  # of the cleaned UTF-8 text
    alphabet: list[str]
    normalised: dict[str, int]


@dataclass
class Plan:
    """Everything decided before encoding starts."""

    label: str
    name: str
    tokenizer: Tokenizer
    dtype: Any
    val_fraction: float
    workers: int
    source: Source | None = None
    hub: HubSource | None = None
    scan: Scan | None = None
    split_at: int = 0

    def fingerprint(self, cfg: PrepareConfig) -> dict[str, Any]:
        """What the token files depend on: a resume continues only if all of it is unchanged."""
        return {"format": META_FORMAT_VERSION, "source": self.label,
                "input": self.scan.sha256 if self.scan else self.hub.fingerprint(),
                "tokenizer": self.tokenizer.spec(), "dtype": np.dtype(self.dtype).name,
                "split_at": self.split_at, "val_fraction": self.val_fraction,
                "keep_newlines": cfg.keep_newlines, "text_field": cfg.text_field,
                "chunk_chars": layout.CHUNK_CHARS, "piece_chars": layout.PIECE_CHARS}


def prepare(cfg: PrepareConfig) -> Path:
    """Tokenize the configured dataset; returns the dataset directory."""
    plan = make_plan(cfg)
    out = Path(cfg.data_dir) / plan.name
    with _cleanup_new_dirs(out):
        writer = TokenWriter(out, plan.fingerprint(cfg))
        meta = read_meta(out) if writer.complete else encode_all(plan, writer, cfg)
    _print_summary(meta, out)
    return out


def make_plan(cfg: PrepareConfig) -> Plan:
    """Resolve the source, read it once if it is local, and choose tokenizer and workers."""
    source, hub, default_name = resolve_source(cfg)
    name = cfg.name or default_name
    if not name or Path(name).name != name or name in (".", ".."):
        raise DataError(f"--name {name!r} must be a plain directory name, e.g. --name=mytext")
    choice = cfg.tokenizer
    if choice == AUTO:
        choice = KNOWN_DATASETS.get(cfg.dataset) or ("gpt2" if hub else "char")
    workers = cfg.num_proc or available_cores()
    if hub:
        if choice == "char":
            raise DataError(f"{hub.label} needs a BPE tokenizer (documents end with an "
                            "end-of-text token); use --tokenizer=gpt2, tiktoken:NAME or hf:PATH")
        tokenizer = make_tokenizer(choice)
        if tokenizer.eot_id is None:
            raise DataError(f"tokenizer {choice} has no end-of-text token to end each document "
                            f"of {hub.label} with; use --tokenizer=gpt2")
        hub.load()
        plan = Plan(hub.label, name, tokenizer, _dtype(tokenizer), hub.val_fraction, workers,
                    hub=hub)
        size = hub.nbytes()
    else:
        report_skipped(source)
        scan = scan_text(source, Cleaner(cfg.keep_newlines))
        val_fraction = cfg.val_fraction or DEFAULT_VAL_FRACTION
        split_at = int(scan.chars * (1 - val_fraction))  # nanoGPT: data[:int(n*0.9)]
        if split_at == 0 or split_at == scan.chars:
            raise DataError(f"{source.label} has only {scan.chars} characters: too short for a "
                            f"non-empty train and val split at val_fraction={val_fraction}")
        tokenizer = make_tokenizer(choice, scan.alphabet)
        plan = Plan(source.label, name, tokenizer, _dtype(tokenizer), val_fraction, workers,
                    source=source, scan=scan, split_at=split_at)
        size = scan.chars
    if not cfg.num_proc and size < MIN_CHUNKS_PER_WORKER * workers * layout.CHUNK_CHARS:
        plan.workers = 1  # starting worker processes would cost more than it saves
    return plan


def encode_all(plan: Plan, writer: TokenWriter, cfg: PrepareConfig) -> dict[str, Any]:
    """Second pass: encode chunk by chunk into the token files (after what a crash left)."""
    totals = {"documents": 0, "characters": 0, "bom": 0, "crlf": 0, "cr": 0, **writer.totals}
    if plan.hub:  # documents are cleaned in the workers; resume skips rows, unread
        chunks = layout.chunks(layout.document_items(plan.hub, skip=totals["documents"]))
        progress = Progress("prepare", plan.hub.num_rows())
    else:  # one text: the pieces before the resume point must be read again
        chunks = layout.chunks(layout.text_items(plan.source, Cleaner(cfg.keep_newlines),
                                                 plan.split_at, bpe=plan.tokenizer.kind != "char"))
        collections.deque(itertools.islice(chunks, writer.chunks_done), maxlen=0)
        progress = Progress("prepare", plan.scan.chars)
    itemsize = np.dtype(plan.dtype).itemsize
    if writer.chunks_done:
        print(f"resuming: {writer.chunks_done:,} chunks already written "
              f"({writer.bytes_written // itemsize:,} tokens)", flush=True)
    progress.skip(totals["documents"] if plan.hub else totals["characters"], totals["documents"],
                  writer.bytes_written // itemsize)
    try:
        for chunk, ids, stats in encode_chunks(
                chunks, plan.tokenizer, eot=plan.hub is not None, dtype=plan.dtype,
                workers=plan.workers, keep_newlines=cfg.keep_newlines if plan.hub else None):
            totals["documents"] += chunk.docs
            for key, n in stats.items():
                totals[key] += n
            writer.write(chunk.split, ids, totals)
            progress.update(chunk.docs if plan.hub else stats["characters"], chunk.docs, len(ids))
    except BaseException:
        writer.close()  # keeps what is on disk for the next run to continue from
        raise
    finally:
        progress.close()
    train_tokens, val_tokens = (n // itemsize for n in writer.lengths)
    return writer.finish({
        "format_version": META_FORMAT_VERSION,
        "name": plan.name,
        "tokenizer": plan.tokenizer.spec(),
        "dtype": np.dtype(plan.dtype).name,
        "vocab_size": plan.tokenizer.vocab_size,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "characters": totals["characters"],
        "documents": totals["documents"],
        "val_fraction": plan.val_fraction,
        "source": plan.label,
        "source_sha256": plan.scan.sha256 if plan.scan else None,
        "layout": "documents" if plan.hub else "text",
        "eot_after_each_document": plan.hub is not None,
        "text_field": cfg.text_field,
        "keep_newlines": cfg.keep_newlines,
        "normalised": (plan.scan.normalised if plan.scan else
                       {key: totals[key] for key in ("bom", "crlf", "cr")}),
        "files": len(plan.source.files) if plan.source else None,
        "skipped_binary_files": len(plan.source.skipped) if plan.source else 0,
    })


def report_skipped(source: Source) -> None:
    """One line naming the binary files a folder or glob had (left out), if any."""
    if source.skipped:
        names = ", ".join(p.name for p in source.skipped[:3])
        more = ", ..." if len(source.skipped) > 3 else ""
        print(f"skipped {len(source.skipped):,} binary file(s) of {source.label} ({names}{more});"
              f" reading {len(source.files):,} text file(s)", flush=True)


def scan_text(source: Source, cleaner: Cleaner) -> Scan:
    """First pass: characters, documents, sha256 of the clean UTF-8 text, distinct characters."""
    n, docs, sha, alphabet = 0, 0, hashlib.sha256(), set()
    progress = Progress("reading", source.size())
    for piece, started in layout.joined_pieces(source, cleaner):
        data = piece.encode("utf-8", "surrogatepass")
        n += len(piece)
        docs += started
        sha.update(data)
        alphabet.update(piece)
        progress.update(len(data), started)
    progress.close()
    if n == 0:
        raise DataError(f"{source.label} is empty; give a file with some text")
    return Scan(n, docs, sha.hexdigest(), sorted(alphabet), dict(cleaner.counts))


def resolve_source(cfg: PrepareConfig) -> tuple[Source | None, HubSource | None, str]:
    """(local source, hub source, default name): one of the two sources is None."""
    dataset = cfg.dataset
    if dataset in KNOWN_DATASETS:
        return tiny_shakespeare(cfg.source), None, dataset
    found = hub_source(dataset, cfg.source, cfg.split, cfg.text_field, cfg.tokens,
                       cfg.val_fraction)
    if found:
        return None, *found
    if cfg.source:
        raise DataError(f"--source only applies to {', '.join([*KNOWN_DATASETS, *RECIPES])}; "
                        f"to prepare {cfg.source} run `folio prepare {cfg.source}`")
    if cfg.tokens:
        raise DataError("--tokens only applies to fineweb-edu, e.g. "
                        "`folio prepare fineweb-edu --tokens=10B`")
    local = local_source(dataset, cfg.text_field, cfg.include, cfg.exclude)
    if local:
        return local[0], None, local[1]
    path = Path(dataset)
    if "/" in dataset or "\\" in dataset or path.suffix:
        raise DataError(f"{dataset} does not exist; give a .txt, .jsonl[.gz|.zst] or .parquet "
                        "file, a directory or a glob of them")
    known = [*KNOWN_DATASETS, *RECIPES]
    hint = nearest_key(dataset, known).replace("--", "")
    raise DataError(f"unknown dataset {dataset!r}{hint} (known: {', '.join(known)}, "
                    "hf:NAME[:CONFIG]; or give the path of a .txt file, a directory or a .jsonl "
                    "file)")


def _dtype(tokenizer: Tokenizer) -> Any:
    """uint16 while every id fits (ids up to 65,535), else uint32."""
    return np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32


def _print_summary(meta: dict[str, Any], out: Path) -> None:
    print(f"length of dataset in characters: {meta['characters']:,}\n"
          f"vocab size: {meta['vocab_size']:,} ({meta['tokenizer']['kind']})\n"
          f"train has {meta['train_tokens']:,} tokens\n"
          f"val has {meta['val_tokens']:,} tokens")
    changed = meta.get("normalised") or {}
    if any(changed.values()):
        print(f"cleaned: {changed['bom']:,} byte-order mark(s) removed, {changed['crlf']:,} "
              f"\\r\\n and {changed['cr']:,} \\r line endings made \\n "
              "(--keep_newlines keeps them)")
    print(f"wrote {out}/ (train.bin, val.bin, meta.json)")


@contextlib.contextmanager
def _cleanup_new_dirs(path: Path) -> Iterator[None]:
    """Create `path` (and parents); on failure remove the directories this created (if empty)."""
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
