"""What gets encoded, in order: the chunks of (split, texts) that a source becomes.

- Text layout (your files, tiny Shakespeare): documents joined by DOC_SEPARATOR into one text;
  the first (1 - val_fraction) of its characters is train, the rest val, as in nanoGPT's
  shakespeare prepare. For BPE the text is cut only where GPT-2's pre-tokenizer always splits,
  so encoding piece by piece equals encoding the whole text.
- Document layout (Hugging Face datasets): each document is encoded on its own and followed by
  the end-of-text token, train documents first, as in nanoGPT's openwebtext prepare.

Chunk boundaries depend only on the input, so a resumed prepare skips exactly what it wrote.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from folio.data.clean import Cleaner
from folio.data.hub import HubSource
from folio.data.sources import Source

DOC_SEPARATOR = "\n\n"  # between the files of a directory and the records of a .jsonl
CHUNK_CHARS = 1 << 20  # text per chunk: the unit of parallel work and of resume
PIECE_CHARS = 1 << 20  # BPE text is re-cut into pieces of about this size
# Where a BPE piece may end: before " X" or after "\nX" that follow a non-space character.
# GPT-2's pre-tokenizer always splits there (a cut before "\n" or inside spaces would not).
SAFE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")

Item = tuple[int, str, int]  # (split: 0 train / 1 val, text, documents it starts)


@dataclass
class Chunk:
    split: int
    texts: list[str]
    docs: int  # documents started in this chunk
    chars: int


def joined_pieces(source: Source, cleaner: Cleaner) -> Iterator[tuple[str, int]]:
    """The cleaned text of all documents, joined by DOC_SEPARATOR: (piece, documents started)."""
    any_text = False
    for document in source.documents():
        new = True
        for piece in cleaner.pieces(document):
            if new and any_text:
                yield DOC_SEPARATOR, 0
            yield piece, int(new)
            new, any_text = False, True


def text_items(source: Source, cleaner: Cleaner, split_at: int, bpe: bool) -> Iterator[Item]:
    """Text layout: characters before split_at are train, the rest val."""
    items = _split(joined_pieces(source, cleaner), split_at)
    return _bpe_pieces(items) if bpe else items


def document_items(hub: HubSource, skip: int = 0) -> Iterator[Item]:
    """Document layout: every train document, then every val document, after the first `skip`
    (raw: they are cleaned where they are encoded). Chunks restart at any chunk boundary."""
    for split, name in enumerate(("train", "val")):
        start = min(skip, hub.num_rows(name))
        skip -= start
        for text in hub.documents(name, start):
            yield split, text, 1


def chunks(items: Iterable[Item]) -> Iterator[Chunk]:
    """Consecutive items of one split, grouped until a chunk holds CHUNK_CHARS characters."""
    current: Chunk | None = None
    for split, text, docs in items:
        if current and (current.split != split or current.chars >= CHUNK_CHARS):
            yield current
            current = None
        current = current or Chunk(split, [], 0, 0)
        current.texts.append(text)
        current.docs += docs
        current.chars += len(text)
    if current:
        yield current


def _split(pieces: Iterable[tuple[str, int]], split_at: int) -> Iterator[Item]:
    pos = 0
    for piece, docs in pieces:
        end = pos + len(piece)
        if pos < split_at < end:
            yield 0, piece[:split_at - pos], docs
            yield 1, piece[split_at - pos:], 0
        else:
            yield (0 if end <= split_at else 1), piece, docs
        pos = end


def _bpe_pieces(items: Iterable[Item]) -> Iterator[Item]:
    """Re-cut pieces at SAFE_CUT points; each split is encoded as its own text, like nanoGPT."""
    buffer, current, docs = "", 0, 0
    for split, piece, started in items:
        if split != current:
            if buffer:
                yield current, buffer, docs
            buffer, current, docs = "", split, 0
        buffer += piece
        docs += started
        if len(buffer) >= PIECE_CHARS:
            tail = max(len(buffer) - (1 << 16), 0)
            cut = max((m.start() for m in SAFE_CUT.finditer(buffer, tail)), default=0)
            if cut or len(buffer) >= 16 * PIECE_CHARS:  # no safe cut in 16 MB: cut anyway
                cut = cut or len(buffer)
                yield current, buffer[:cut], docs
                buffer, docs = buffer[cut:], 0
    if buffer:
        yield current, buffer, docs
