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

from folio.data.layout import Chunk
from folio.data.tokenizer import Tokenizer, tokenizer_from_spec

IN_FLIGHT_PER_WORKER = 3
_worker_tokenizer: Tokenizer | None = None  # set in each worker process by _start_worker


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def encode_texts(tokenizer: Tokenizer, texts: list[str], eot: bool, dtype: Any) -> np.ndarray:
    """Concatenated ids of `texts`; with `eot`, each text is followed by the end-of-text id."""
    parts = []
    end = np.array([tokenizer.eot_id if eot else 0], dtype=dtype)
    for text in texts:
        parts.append(tokenizer.encode_array(text, dtype))
        if eot:
            parts.append(end)
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def encode_chunks(chunks: Iterable[Chunk], tokenizer: Tokenizer, eot: bool, dtype: Any,
                  workers: int) -> Iterator[tuple[Chunk, np.ndarray]]:
    """(chunk, its ids) in order; the chunk's texts are dropped once they are sent off."""
    if workers <= 1:
        for chunk in chunks:
            ids = encode_texts(tokenizer, chunk.texts, eot, dtype)
            chunk.texts = []
            yield chunk, ids
        return
    # spawn, not fork: the parent may hold threads (torch, tokenizers) that fork would break.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _start_worker, (tokenizer.spec(),)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            job = pool.apply_async(_encode_in_worker, (chunk.texts, eot, np.dtype(dtype).name))
            chunk.texts = []
            pending.append((chunk, job))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                done, job = pending.popleft()
                yield done, job.get()
        while pending:
            done, job = pending.popleft()
            yield done, job.get()


def _start_worker(spec: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_spec(spec)


def _encode_in_worker(texts: list[str], eot: bool, dtype: str) -> np.ndarray:
    assert _worker_tokenizer is not None
    return encode_texts(_worker_tokenizer, texts, eot, dtype)
