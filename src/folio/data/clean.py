"""Clean text: UTF-8 decoded strictly (a bad byte is an error naming file and offset), a leading
byte-order mark stripped, and `\\r\\n` / `\\r` line endings turned into `\\n` (unless kept).

`Cleaner` counts what it changed; prepare records the counts in meta.json.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

from folio.errors import DataError

BOM = "\ufeff"


class Cleaner:
    """Cleans documents (whole strings, or one document in pieces) and counts what changed."""

    def __init__(self, keep_newlines: bool = False) -> None:
        self.keep_newlines = keep_newlines
        self.counts = {"bom": 0, "crlf": 0, "cr": 0}  # documents with a BOM; line endings changed

    def document(self, text: str) -> str:
        """One whole document, cleaned."""
        return self._newlines(self._strip_bom(text))

    def pieces(self, pieces: Iterable[str]) -> Iterator[str]:
        """One document given in pieces, cleaned; a `\\r\\n` split between pieces stays one."""
        first, carry = True, ""
        for piece in pieces:
            if first and piece:
                piece, first = self._strip_bom(piece), False
            if self.keep_newlines:
                if piece:
                    yield piece
                continue
            piece, carry = carry + piece, ""
            if piece.endswith("\r"):  # its "\n" may start the next piece
                piece, carry = piece[:-1], "\r"
            if piece:
                yield self._newlines(piece)
        if carry:
            yield self._newlines(carry)

    def _strip_bom(self, text: str) -> str:
        if text.startswith(BOM):
            self.counts["bom"] += 1
            return text[1:]
        return text

    def _newlines(self, text: str) -> str:
        if self.keep_newlines or "\r" not in text:
            return text
        crlf = text.count("\r\n")
        text = text.replace("\r\n", "\n")
        self.counts["crlf"] += crlf
        self.counts["cr"] += text.count("\r")
        return text.replace("\r", "\n")


def decode_utf8(blocks: Iterable[bytes], name: str) -> Iterator[str]:
    """Blocks of bytes decoded as UTF-8; an invalid byte is a DataError naming its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes decoded so far
    for block in _with_end(blocks):
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise DataError(f"{name} is not UTF-8 text: invalid byte at offset "
                            f"{offset - pending + e.start}; convert it to UTF-8 "
                            "(e.g. iconv -t UTF-8)") from None
        if text:
            yield text
        offset += len(block)


def _with_end(blocks: Iterable[bytes]) -> Iterator[bytes]:
    for block in blocks:
        if block:
            yield block
    yield b""
