"""Releasing the resident pages of memory-mapped files this process reads.

Pages of a memory-mapped file that a process touches count in its resident memory (RSS) until
the kernel needs the memory back, so streaming once through a 50 GB Arrow cache looks like a
50 GB process. `MappedFiles.release` tells the kernel (madvise MADV_DONTNEED) that this
process no longer needs its read-only mappings of the given files: they leave its RSS, stay in
the page cache, and a later access reads them in again. Only read-only, file-backed mappings
of exactly those files are touched, found in /proc/self/maps; elsewhere than Linux it does
nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable

MADV_RANDOM, MADV_DONTNEED = 1, 4  # Linux


class MappedFiles:
    """The read-only memory mappings that some files have in this process now, whose pages
    can be released. Found once (reading /proc/self/maps costs more than releasing), so the
    objects holding those mappings must outlive this one (hub.documents keeps its tables)."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = {os.path.realpath(p) for p in paths}
        self.libc = None
        self.ranges: list[tuple[int, int]] = []
        if sys.platform.startswith("linux") and self.paths:
            self.libc = ctypes.CDLL(None, use_errno=True)
            self.libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            self.ranges = self._find()

    def _find(self) -> list[tuple[int, int]]:
        """(start, end) addresses of this process's read-only mappings of the files."""
        found = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # range perms offset dev inode path
                if len(fields) == 6 and "w" not in fields[1] \
                        and fields[5].rstrip("\n") in self.paths:
                    start, end = (int(a, 16) for a in fields[0].split("-"))
                    found.append((start, end))
        return found

    def release(self) -> None:
        """Drop the files' pages from this process's resident memory (a hint: errors are
        ignored, the data stays correct either way)."""
        self._advise(MADV_DONTNEED)

    def read_randomly(self) -> None:
        """Map only the page each access needs (no read-around): for access in random order,
        where the kernel's default maps tens of neighbouring pages per fault."""
        self._advise(MADV_RANDOM)

    def _advise(self, advice: int) -> None:
        for start, end in self.ranges:
            self.libc.madvise(start, end - start, advice)
