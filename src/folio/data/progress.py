"""A one-line progress report on stderr: percent done, documents/s, tokens/s and ETA.

On a terminal the line redraws twice a second; in a log it is printed every 30 seconds.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Tracks work done out of a known total (characters, bytes or documents)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, max(total, 1)
        self.tty = sys.stderr.isatty()
        self.every_s = 0.5 if self.tty else 30.0
        self.start = self.last = time.monotonic()
        self.done = self.docs = self.tokens = 0
        self.base = (0, 0, 0)  # counts skipped on resume: not part of the rates
        self.shown = False

    def skip(self, done: int, docs: int, tokens: int) -> None:
        """Work found already done (a resumed prepare)."""
        self.update(done, docs, tokens)
        self.base = (self.done, self.docs, self.tokens)
        self.start = time.monotonic()

    def update(self, done: int, docs: int = 0, tokens: int = 0) -> None:
        self.done += done
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        done, docs, tokens = (a - b for a, b in
                              zip((self.done, self.docs, self.tokens), self.base, strict=True))
        left = max(self.total - self.done, 0) * elapsed / done if done else 0.0
        percent = min(100 * self.done / self.total, 100)
        return (f"{self.label}: {percent:5.1f}% | {self.docs:,} docs ({docs / elapsed:,.0f}/s) | "
                f"{self.tokens:,} tokens ({tokens / elapsed:,.0f}/s) | ETA {_duration(left)}")

    def close(self) -> None:
        if self.shown and self.tty:
            print(file=sys.stderr, flush=True)

    def _show(self, now: float) -> None:
        self.shown = True
        print(("\r" if self.tty else "") + self.line(now), end="" if self.tty else "\n",
              file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
