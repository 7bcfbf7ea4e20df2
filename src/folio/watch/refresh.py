"""Redrawing a run's loss.png while it trains, in a separate low-priority process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path


class BackgroundRefresh:
    """Redraws `<run_dir>/loss.png` from metrics.jsonl in a separate low-priority process, so
    training never waits for matplotlib nor shares the GIL or a busy core with it.

    Requests made while a render runs collapse into one render of the latest rows; `close()`
    draws once more and waits for it. The child reads the title from run.json and never
    imports torch.
    """

    def __init__(self, run_dir: Path):
        self.args = [sys.executable, "-c", "import sys; from folio.watch.plot import refresh_loop; "
                     "refresh_loop(sys.argv[1])", str(run_dir)]
        self.proc: subprocess.Popen | None = None  # started at the first request

    def _start(self) -> subprocess.Popen:
        src = str(Path(__file__).resolve().parents[2])  # so the child imports this folio
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        return subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                env=env, start_new_session=True)  # Ctrl+C is for training

    def request(self) -> None:
        self.proc = self.proc or self._start()
        if self.proc.stdin.closed:
            return
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
        except OSError:  # the child died; it said why on stderr
            self.proc.stdin.close()

    def close(self, timeout: float = 60.0) -> None:
        if self.proc is None:  # never asked to draw
            return
        self.request()
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
