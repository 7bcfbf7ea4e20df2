"""Token files written chunk by chunk, resumable after a crash, and finished atomically.

Work happens in `<dataset>/.partial/`: train.bin and val.bin grow chunk by chunk, and about once
a second `progress.json` records how many chunks are on disk, the two files' lengths and the
caller's running totals (documents, characters, ...) then. A
rerun with the same settings (same fingerprint) cuts the files back to those lengths and goes on
with the next chunk; any other state starts over. `finish` checksums the files, writes meta.json
into the work dir, then moves the files into place and meta.json last: a dataset directory with a
meta.json is complete, and an interrupted finish completes on the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from folio.fsutil import atomic_write_json, fsync_dir, sha256_file

SPLITS = ("train", "val")
WORK_DIR = ".partial"
COMMIT_EVERY_S = 1.0


class TokenWriter:
    """Appends token arrays to the train/val files of one dataset directory."""

    def __init__(self, out: Path, fingerprint: dict[str, Any]) -> None:
        self.out = out
        self.work = out / WORK_DIR
        self.fingerprint = hashlib.sha256(
            json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        self.complete = False
        if (self.work / "meta.json").is_file():  # a finish was interrupted: complete it
            finished = self._read_json("meta.json").get("fingerprint")
            self._move_into_place()
            if finished == self.fingerprint:
                self.complete = True
                return
        state = self._read_json("progress.json")
        if not self._can_resume(state):
            shutil.rmtree(self.work, ignore_errors=True)
            state = {}
        self.work.mkdir(parents=True, exist_ok=True)
        self.chunks_done = state.get("chunks", 0)
        self.totals: dict[str, int] = state.get("totals", {})  # the caller's, for its resume
        lengths = state.get("bytes", [0, 0])
        self.files = []
        for split, length in zip(SPLITS, lengths, strict=True):
            path = self.work / f"{split}.bin"
            f = open(path, "r+b" if path.exists() else "w+b")
            f.truncate(length)  # drop whatever was written after the last commit
            f.seek(length)
            self.files.append(f)
        self.lengths = list(lengths)
        self._last_commit = time.monotonic()

    @property
    def bytes_written(self) -> int:
        return sum(self.lengths)

    def write(self, split: int, ids: np.ndarray, totals: dict[str, int]) -> None:
        """Append one chunk's ids to a split; `totals` are the caller's counts up to and
        including this chunk, given back as `self.totals` on resume. Commits now and then."""
        data = ids.tobytes()
        self.files[split].write(data)
        self.lengths[split] += len(data)
        self.chunks_done += 1
        self.totals = dict(totals)
        if time.monotonic() - self._last_commit >= COMMIT_EVERY_S:
            self.commit()

    def commit(self) -> None:
        """Make the chunks written so far survive a crash, and record that they did."""
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(self.work / "progress.json", {
            "fingerprint": self.fingerprint, "chunks": self.chunks_done, "bytes": self.lengths,
            "totals": self.totals})
        self._last_commit = time.monotonic()

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Checksum the files, record `meta` (plus checksums), and move everything into place."""
        self.commit()
        for f in self.files:
            f.close()
        for split in SPLITS:
            meta[f"{split}_sha256"] = sha256_file(self.work / f"{split}.bin")
        meta["fingerprint"] = self.fingerprint  # of the settings and input that made it
        atomic_write_json(self.work / "meta.json", meta)
        self._move_into_place()
        return meta

    def close(self) -> None:
        """Leave the work dir for a later resume (after an error or interrupt)."""
        with contextlib.suppress(Exception):
            self.commit()
        for f in self.files:
            f.close()

    def _can_resume(self, state: dict[str, Any]) -> bool:
        """Same settings and input, and files at least as long as the last commit said."""
        lengths = state.get("bytes")
        if state.get("fingerprint") != self.fingerprint or not isinstance(lengths, list) \
                or len(lengths) != len(SPLITS):
            return False
        paths = [self.work / f"{split}.bin" for split in SPLITS]
        return all(p.is_file() and p.stat().st_size >= n for p, n in zip(paths, lengths,
                                                                         strict=True))

    def _read_json(self, name: str) -> dict[str, Any]:
        try:
            state = json.loads((self.work / name).read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _move_into_place(self) -> None:
        (self.work / "progress.json").unlink(missing_ok=True)  # from here on, only finish
        (self.out / "meta.json").unlink(missing_ok=True)  # the old meta must not describe new files
        for split in SPLITS:
            if (self.work / f"{split}.bin").exists():
                os.replace(self.work / f"{split}.bin", self.out / f"{split}.bin")
        os.replace(self.work / "meta.json", self.out / "meta.json")
        shutil.rmtree(self.work, ignore_errors=True)
        fsync_dir(self.out)
