"""Generation off the event loop: one decoding thread runs up to `max_active` requests at
once; up to `queue_size` more wait; beyond that `submit` refuses at once.

Batched (the default): each engine step is one forward pass over every active request's
choices (infer/decode.py's `BatchDecoder`: each row at its own position, the rows that
arrived or slid prefilled first), then one token sampled per row with the row's own
generator (sample.py's `sample_tokens`: top-k, softmax and the draw of rows alike in one call
each, only the noise drawn row by row). A request that arrives during a step is admitted at
the step's end, prefilled and decoded in the next one: its first token comes within two
steps plus its prefill. A step's events are emitted, then `after_step` runs (the server hands
them to its event loop there, all at once). Each row decodes the windows, and
samples with the generator, that it would alone, so its text is the one it gets alone; the
logits agree to float rounding only (a matmul over 8 rows sums in another order than over
one: ~1e-7 relative), so a token could differ only where two candidates are that close.
With `batch=False`, the old engine: requests take turns, one token each (kept to compare).

One thread owns every model call, so models are never run from two threads, and torch's own
intra-op threads get all the cores instead of several request threads fighting for them.
A cancelled request (client gone, stop button) leaves at its next step and frees its slot.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from folio.infer.decode import BatchDecoder
from folio.infer.sample import TextStream, generate_tokens, sample_tokens
from folio.infer.serve.runs import LoadedModel
from folio.model.gpt import GPT

# Events a job emits, in order, through its callback (from the decoding thread):
#   ("text", index, piece)           a piece of choice `index`
#   ("end", index, finish_reason, completion_tokens)
#   ("error", message)               the job failed; no more events follow
#   ("done",)                        all choices ended
# Batched, the choices of one job are decoded side by side: their events interleave.
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

    def generator(self, index: int) -> torch.Generator:
        """Choice `index`'s random stream: seed + index, or a random seed without one."""
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed + index)
        return generator

    def steps(self) -> Iterator[None]:
        """Decode all choices one after another, yielding after every token (the unbatched
        engine switches jobs there); the engine emits "done" once the job's slot is free."""
        for index in range(self.n):
            choice = Choice(self, index)
            for token in generate_tokens(self.loaded.model, self.prompt_ids, self.max_tokens,
                                         self.temperature, self.top_k, self.top_p,
                                         choice.generator):
                if choice.take(token):
                    break
                yield
            choice.end()


@dataclass(eq=False)
class Choice:
    """One choice of a job being decoded: its random stream, text and token count."""

    job: Job
    index: int
    generator: torch.Generator = field(init=False)
    text: TextStream = field(init=False)
    count: int = 0
    reason: str = "length"

    def __post_init__(self) -> None:
        self.generator = self.job.generator(self.index)
        self.text = TextStream(self.job.loaded.tokenizer, self.job.stop)

    def take(self, token: int) -> bool:
        """Count `token` and emit its text; whether the choice ends with it."""
        self.count += 1
        if token == self.job.loaded.tokenizer.eot_id:
            self.reason = "stop"
            return True
        piece = self.text.push(token)
        if piece:
            self.job.emit(("text", self.index, piece))
        if self.text.stopped:
            self.reason = "stop"
            return True
        return self.count >= self.job.max_tokens

    def end(self) -> None:
        tail = self.text.finish()
        if tail:
            self.job.emit(("text", self.index, tail))
        self.job.emit(("end", self.index, self.reason, self.count))


class Engine:
    """The decoding thread and its bounded queue."""

    def __init__(self, max_active: int, queue_size: int, batch: bool = True,
                 after_step: Callable[[], None] | None = None) -> None:
        """`after_step` is called from the decoding thread after every step, when the step's
        events have all been emitted (the server hands them to its event loop there)."""
        self.max_active, self.capacity, self.batch = max_active, max_active + queue_size, batch
        self.after_step = after_step
        self.steps = 0  # engine steps so far: first-token latency is counted in these
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
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
                    "max_active": self.max_active, "capacity": self.capacity,
                    "batch": self.batch, "steps": self.steps}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._active + list(self._waiting):
                job.cancelled.set()
            self._cond.notify()
        self._thread.join(timeout=10)

    def _admit(self) -> list[Job]:
        """Wait for work; drop cancelled waiting jobs, move waiting ones into free slots;
        the jobs that started."""
        with self._cond:
            while not (self._active or self._waiting or self._closed):
                self._cond.wait()
            self._waiting = deque(j for j in self._waiting if not j.cancelled.is_set())
            started = []
            while self._waiting and len(self._active) < self.max_active:
                started.append(self._waiting.popleft())
            self._active += started
            return started

    def _finish(self, jobs: list[Job], done: bool = False) -> None:
        """Free the jobs' slots; with `done`, then tell each it is done (a client told so
        may send its next request at once: its slot is free by then)."""
        if jobs:
            with self._cond:
                self._active = [j for j in self._active if j not in jobs]
        for job in jobs if done else ():
            job.emit(("done",))

    def _stepped(self) -> None:
        self.steps += 1
        if self.after_step is not None:
            self.after_step()

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # thread-local: this thread only ever decodes
        (self._run_batched if self.batch else self._run_in_turn)()

    # ------------------------------------------------------------------------ batched

    def _run_batched(self) -> None:
        decoders: dict[GPT, BatchDecoder[Choice]] = {}  # one per model in use
        while not self._closed:
            for job in self._admit():
                try:
                    self._start(job, decoders)
                except Exception as e:  # e.g. a model that cannot decode: this job fails alone
                    job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                    self._finish([job])
            for model, decoder in list(decoders.items()):
                self._step(decoder)
                if not decoder.rows:
                    del decoders[model]  # its cache's memory goes with it
            self._stepped()

    def _start(self, job: Job, decoders: dict[GPT, BatchDecoder[Choice]]) -> None:
        """Add a job's choices as rows of its model's decoder (made when none is running)."""
        if job.max_tokens <= 0 or not job.prompt_ids:
            for index in range(job.n):  # nothing to decode
                Choice(job, index).end()
            self._finish([job], done=True)
            return
        model = job.loaded.model
        decoder = decoders.get(model)
        if decoder is None:
            decoder = decoders[model] = BatchDecoder(model)
        for choice in [Choice(job, index) for index in range(job.n)]:
            decoder.add(job.prompt_ids, choice)

    def _step(self, decoder: BatchDecoder[Choice]) -> None:
        """One token for every row of `decoder`; rows whose job was cancelled or failed, or
        whose choice ended, leave."""
        gone = [row for row, c in enumerate(decoder.owners) if c.job.cancelled.is_set()]
        self._finish([decoder.owners[row].job for row in gone])
        decoder.remove(gone)
        if not decoder.rows:
            return
        ended: list[int] = []
        try:
            choices = decoder.owners
            tokens = sample_tokens(decoder.step(),  # logits (rows, V)
                                   [(c.job.temperature, c.job.top_k, c.job.top_p)
                                    for c in choices], [c.generator for c in choices])
            for row, (choice, token) in enumerate(zip(choices, tokens, strict=True)):
                if choice.take(token):
                    ended.append(row)
                else:
                    decoder.push(row, token)
        except Exception as e:  # a broken run must not stop the other models' requests
            jobs = list(dict.fromkeys(c.job for c in decoder.owners))
            for job in jobs:
                job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
            self._finish(jobs)
            decoder.remove(range(decoder.rows))
            return
        left = {c.job for row, c in enumerate(decoder.owners) if row not in ended}
        for row in ended:
            decoder.owners[row].end()
        done = [job for job in dict.fromkeys(decoder.owners[row].job for row in ended)
                if job not in left]
        decoder.remove(ended)
        self._finish(done, done=True)

    # ------------------------------------------------------------------------ in turn

    def _run_in_turn(self) -> None:
        """The unbatched engine: each active job decodes one token in turn."""
        running: dict[Job, Iterator[None]] = {}
        while not self._closed:
            for job in self._admit():
                running[job] = job.steps()
            failed, completed = [], []  # failed: cancelled or broken
            for job, steps in list(running.items()):
                if job.cancelled.is_set():
                    steps.close()
                    failed.append(job)
                    continue
                try:
                    next(steps)
                except StopIteration:
                    completed.append(job)
                except Exception as e:  # a broken run must not stop the other requests
                    job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                    failed.append(job)
            for job in failed + completed:
                del running[job]
            self._finish(failed)
            self._finish(completed, done=True)
            self._stepped()
