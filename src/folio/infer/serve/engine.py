"""Generation off the event loop: one decoding thread interleaves up to `max_active` requests
token by token; up to `queue_size` more wait; beyond that `submit` refuses at once.

One thread owns every model call, so models are never run from two threads, and torch's own
intra-op threads get all the cores instead of several request threads fighting for them.
A cancelled request (client gone, stop button) leaves at its next token and frees its slot.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from folio.infer.sample import TextStream, generate_tokens
from folio.infer.serve.runs import LoadedModel

# Events a job emits, in order, through its callback (from the decoding thread):
#   ("text", index, piece)           a piece of choice `index`
#   ("end", index, finish_reason, completion_tokens)
#   ("error", message)               the job failed; no more events follow
#   ("done",)                        all choices ended
Event = tuple


@dataclass(eq=False)  # jobs compare by identity
class Job:
    """One request: n choices from one prompt, decoded with the given sampling settings."""

    loaded: LoadedModel
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    stop: list[str]
    seed: int | None
    n: int
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def steps(self) -> Iterator[None]:
        """Decode all choices, yielding after every token (where the scheduler may switch)."""
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        for index in range(self.n):
            generator = torch.Generator()
            if self.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.seed + index)
            stream = TextStream(tokenizer, self.stop)
            count, reason = 0, "length"
            for token in generate_tokens(model, self.prompt_ids, self.max_tokens,
                                         self.temperature, self.top_k, self.top_p, generator):
                count += 1
                if token == tokenizer.eot_id:
                    reason = "stop"
                    break
                piece = stream.push(token)
                if piece:
                    self.emit(("text", index, piece))
                if stream.stopped:
                    reason = "stop"
                    break
                yield
            tail = stream.finish()
            if tail:
                self.emit(("text", index, tail))
            self.emit(("end", index, reason, count))
        self.emit(("done",))


class Engine:
    """The decoding thread and its bounded queue."""

    def __init__(self, max_active: int, queue_size: int) -> None:
        self.max_active, self.capacity = max_active, max_active + queue_size
        self._waiting: deque[Job] = deque()
        self._active: list[tuple[Job, Iterator[None]]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="folio-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue `job`; False (at once) when max_active + queue_size jobs are already in."""
        with self._cond:
            if self._closed or len(self._active) + len(self._waiting) >= self.capacity:
                return False
            self._waiting.append(job)
            self._cond.notify()
            return True

    def full(self) -> bool:
        with self._cond:
            return len(self._active) + len(self._waiting) >= self.capacity

    def load(self) -> dict[str, Any]:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting),
                    "max_active": self.max_active, "capacity": self.capacity}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in [j for j, _ in self._active] + list(self._waiting):
                job.cancelled.set()
            self._cond.notify()
        self._thread.join(timeout=10)

    def _admit(self) -> list[tuple[Job, Iterator[None]]]:
        """Drop cancelled waiting jobs, start waiting ones into free slots; the active list."""
        with self._cond:
            while not (self._active or self._waiting or self._closed):
                self._cond.wait()
            self._waiting = deque(j for j in self._waiting if not j.cancelled.is_set())
            while self._waiting and len(self._active) < self.max_active:
                job = self._waiting.popleft()
                self._active.append((job, job.steps()))
            return list(self._active)

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # thread-local: this thread only ever decodes
        while not self._closed:
            finished = []
            for job, steps in self._admit():
                if job.cancelled.is_set():
                    steps.close()
                    finished.append(job)
                    continue
                try:
                    next(steps)
                except StopIteration:
                    finished.append(job)
                except Exception as e:  # a broken run must not stop the other requests
                    job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                    finished.append(job)
            if finished:
                with self._cond:
                    self._active = [(j, s) for j, s in self._active if j not in finished]
