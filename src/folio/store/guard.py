"""Protection of a run dir: one training process at a time, and no fresh run over saved weights.

`folio train` claims its out_dir before touching anything in it: an exclusive `flock` on
`<out_dir>/.lock` (the holder's pid and host written inside), held until training ends. The
kernel drops the lock when its process dies, so a killed run never blocks the next one.
Readers (sample, plot, export) never take the lock: every file is replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from folio.errors import CheckpointError
from folio.store.rundir import (
    EVALS_FILE,
    LOCK_FILE,
    MODEL_FILE,
    REPORT_FILE,
    REPORT_MD_FILE,
    RESUME_FILE,
    RUN_INFO,
    SAMPLES_FILE,
    TEMP_FILES,
    WRITE_PROBE,
    has_weights,
    is_nanogpt_dir,
    read_run_info,
)


class RunDirInUse(CheckpointError):
    """Another live process is training into this run dir."""


class RunExists(CheckpointError):
    """A fresh run would replace a run dir's saved weights."""


def saved_run(run_dir: Path) -> str | None:
    """What a fresh run would destroy in run_dir, in words; None when nothing.

    A run killed before its first checkpoint left no weights, so it is not protected.
    """
    if is_nanogpt_dir(run_dir):
        return "a nanoGPT checkpoint (ckpt.pt)"
    if not has_weights(run_dir):
        return None
    try:
        info = read_run_info(run_dir)
    except CheckpointError:
        return "saved weights (its run.json is unreadable)"
    loss = (f"best val loss {info.best_val_loss:.4f}" if info.best_val_loss is not None
            else "no eval yet")
    return f"a run at iter {info.iter_num} ({loss})"


def check_fresh(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a new run over a saved one unless `overwrite`."""
    held = saved_run(run_dir)
    if held and not overwrite:
        raise RunExists(f"out_dir {run_dir} already holds {held}; continue it with "
                        "--init_from=resume, choose another --out_dir, or pass "
                        "--overwrite=True to replace it")


class RunLock:
    """A claimed run dir's lock; `record_holder` writes who holds it, once setup succeeded."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.started = False  # the holder was recorded: the run has begun

    def record_holder(self) -> None:
        if self.fd < 0:  # nothing was claimed
            return
        self.started = True
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(holder) + "\n").encode(), 0)


@contextlib.contextmanager
def claim(run_dir: str | Path, fresh: bool, overwrite: bool = False) -> Iterator[RunLock]:
    """Hold run_dir's lock for a training process; a fresh run also checks (under the lock)
    that no saved run would be lost, and with `overwrite` removes the old run's files.

    Nothing in run_dir is written before both checks pass. If the block ends before
    `record_holder` (setup failed), what the claim created (the run dir, or only its lock
    file) is removed again: a failed start leaves the run dir as it found it. Resuming a dir
    that does not exist claims nothing (loading it fails with its own message).
    """
    run_dir = Path(run_dir)
    if not fresh and not run_dir.exists():
        yield RunLock(-1)
        return
    created_dir = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, created_lock = _open_lock(run_dir / LOCK_FILE)
    except OSError as e:
        raise _unwritable(run_dir, e) from None
    lock = None
    try:
        if not _lock_exclusive(fd):
            raise RunDirInUse(f"out_dir {run_dir} is being trained by {_holder(fd)}; wait for "
                              "it to end, stop it, or choose another --out_dir")
        lock = RunLock(fd)
        if fresh:
            check_fresh(run_dir, overwrite)
        try:
            _prepare(run_dir, clear=fresh and overwrite)
        except OSError as e:
            raise _unwritable(run_dir, e) from None
        yield lock
    finally:
        if lock is not None and created_lock and not lock.started:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)  # while held: no one else has it
        os.close(fd)  # releases the lock
        if created_dir and not (lock and lock.started):
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if setup left it empty


def _lock_exclusive(fd: int, tries: int = 10, pause_s: float = 0.05) -> bool:
    """Take the exclusive lock without blocking; a reader's probe (`is_training`) holds a
    shared lock for microseconds, so a refusal is retried a few times before it counts."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < tries - 1:
                time.sleep(pause_s)
    return False


def is_training(run_dir: str | Path) -> bool:
    """Whether a training process holds `<run_dir>/.lock` (tested without waiting, without
    creating anything)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the shared lock if we got it
    return False


def _open_lock(path: Path) -> tuple[int, bool]:
    """(fd, whether this call created the file)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
    except FileExistsError:
        return os.open(path, os.O_RDWR), False


def _prepare(run_dir: Path, clear: bool) -> None:
    """Check the disk takes a write, drop temp files a kill left behind, clear on overwrite."""
    probe = run_dir / WRITE_PROBE
    probe.write_bytes(b"x" * 4096)
    probe.unlink()
    for stale in run_dir.glob(TEMP_FILES):
        stale.unlink()
    if clear:  # --overwrite=True: the old run's files go (metrics.jsonl is truncated on open)
        for name in (RUN_INFO, MODEL_FILE, RESUME_FILE, EVALS_FILE, SAMPLES_FILE, REPORT_FILE,
                     REPORT_MD_FILE):
            (run_dir / name).unlink(missing_ok=True)


def _holder(fd: int) -> str:
    """The lock holder as its lock file describes it (if that holder is still alive)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        pid, host = int(holder["pid"]), str(holder["host"])
        if host == socket.gethostname():
            os.kill(pid, 0)  # a pid left by an earlier holder is not the live one
        return f"pid {pid} on {host} (since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (still starting up)"


def _unwritable(run_dir: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"cannot write to out_dir {run_dir} ({e.strerror}); choose a "
                           "writable --out_dir or free some space")
