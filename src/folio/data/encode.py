"""Chunks of text -> token arrays, in worker processes across the cores, in input order.

Only a few chunks per worker are in flight at once, so memory stays bounded for any corpus.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from folio.data.clean import Cleaner
from folio.data.layout import Chunk
from folio.data.tokenizer import Tokenizer, tokenizer_from_spec

IN_FLIGHT_PER_WORKER = 3
_worker_tokenizer: Tokenizer | None = None  # set in each worker process by _start_worker


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def encode_texts(tokenizer: Tokenizer, texts: list[str], eot: bool, dtype: Any,
                 keep_newlines: bool | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Concatenated ids of `texts` (each followed by the end-of-text id with `eot`), and stats:
    characters encoded, and what cleaning changed (`keep_newlines` None: texts are clean)."""
    cleaner = Cleaner(bool(keep_newlines)) if keep_newlines is not None else None
    parts, characters = [], 0
    end = np.array([tokenizer.eot_id if eot else 0], dtype=dtype)
    for text in texts:
        if cleaner:
            text = cleaner.document(text)
        characters += len(text)
        parts.append(tokenizer.encode_array(text, dtype))
        if eot:
            parts.append(end)
    ids = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
    return ids, {"characters": characters, **(cleaner.counts if cleaner else {})}


def encode_chunks(chunks: Iterable[Chunk], tokenizer: Tokenizer, eot: bool, dtype: Any,
                  workers: int, keep_newlines: bool | None = None
                  ) -> Iterator[tuple[Chunk, np.ndarray, dict[str, int]]]:
    """(chunk, its ids, stats) in order; a chunk's texts are dropped once they are sent off.
    With `keep_newlines` not None the texts are cleaned first (in the workers)."""
    if workers <= 1:
        for chunk in chunks:
            ids, stats = encode_texts(tokenizer, chunk.texts, eot, dtype, keep_newlines)
            chunk.texts = []
            yield chunk, ids, stats
        return
    # spawn, not fork: the parent may hold threads (torch, tokenizers) that fork would break.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _start_worker, (tokenizer.spec(),)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            job = pool.apply_async(_encode_in_worker, (chunk.texts, eot, np.dtype(dtype).name,
                                                       keep_newlines))
            chunk.texts = []
            pending.append((chunk, job))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                done, job = pending.popleft()
                yield done, *job.get()
        while pending:
            done, job = pending.popleft()
            yield done, *job.get()


def _start_worker(spec: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_spec(spec)


def _encode_in_worker(texts: list[str], eot: bool, dtype: str,
                      keep_newlines: bool | None) -> tuple[np.ndarray, dict[str, int]]:
    assert _worker_tokenizer is not None
    return encode_texts(_worker_tokenizer, texts, eot, dtype, keep_newlines)
