"""The cleaned text of any source `folio prepare` reads (files, folders, globs, .jsonl/.parquet,
`hf:` datasets, tiny Shakespeare), as a stream of blocks of bounded size, for the tokenizer
commands: training reads it once, evaluation too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from folio.config import PrepareConfig
from folio.data.clean import Cleaner
from folio.data.layout import DOC_SEPARATOR, SAFE_CUT, joined_pieces
from folio.data.prepare import report_skipped, resolve_source
from folio.data.progress import Progress

BLOCK_CHARS = 1 << 16  # text handed on at a time: ~64K characters, cut where BPE splits anyway


@dataclass
class Texts:
    """A source's cleaned text; iterate it once for its blocks (with a progress line)."""

    label: str
    name: str  # a short name for what it is (the dataset's default name)
    size: int  # bytes to read, for the progress line (compressed files count as stored)
    pieces: Iterator[str]
    max_chars: int = 0  # stop after this many characters; 0: read everything
    counts: dict[str, int] = field(default_factory=lambda: {"characters": 0, "bytes": 0})

    def __iter__(self) -> Iterator[str]:
        progress = Progress("reading", self.size)
        try:
            for block in blocks(self.pieces):
                if self.max_chars and self.counts["characters"] + len(block) > self.max_chars:
                    block = block[:self.max_chars - self.counts["characters"]]
                n = len(block.encode("utf-8"))
                self.counts["characters"] += len(block)
                self.counts["bytes"] += n
                progress.update(n)
                if block:
                    yield block
                if self.max_chars and self.counts["characters"] >= self.max_chars:
                    return
        finally:
            progress.close()


def source_texts(source: str, *, text_field: str = "text", split: str = "train",
                 keep_newlines: bool = False, include: list[str] | None = None,
                 exclude: list[str] | None = None, max_chars: int = 0) -> Texts:
    """The text of `source` cleaned as prepare cleans it (strict UTF-8: a bad byte is an error
    naming file and offset; BOM stripped; \\r\\n and \\r made \\n unless kept). A hub dataset
    gives its train documents (prepare's split), joined by the same separator as files."""
    cfg = PrepareConfig(dataset=source, text_field=text_field, split=split,
                        keep_newlines=keep_newlines, include=include or [],
                        exclude=exclude or [])
    local, hub, name = resolve_source(cfg)
    cleaner = Cleaner(keep_newlines)
    if local is not None:
        report_skipped(local)
        return Texts(local.label, name, local.size(),
                     (piece for piece, _ in joined_pieces(local, cleaner)), max_chars)
    hub.load()
    docs = (cleaner.document(text) for text in hub.documents("train"))
    return Texts(hub.label, name, hub.nbytes(), _joined(docs), max_chars)


def _joined(docs: Iterator[str]) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if i:
            yield DOC_SEPARATOR
        yield doc


def blocks(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces re-cut into blocks of about BLOCK_CHARS, each ending where GPT-2's and GPT-4's
    split patterns always split (layout.SAFE_CUT), or anywhere after 16 blocks' worth."""
    buffer = ""
    for piece in pieces:
        buffer += piece
        while len(buffer) >= BLOCK_CHARS:
            cut = next((m.start() for m in SAFE_CUT.finditer(buffer, BLOCK_CHARS // 2)), 0)
            if not cut and len(buffer) < 16 * BLOCK_CHARS:
                break
            cut = cut or len(buffer)
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer
