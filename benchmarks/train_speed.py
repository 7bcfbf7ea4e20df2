"""Training speed on the CPU: nanoGPT's plain eager float32 path vs folio's default path.

A thin wrapper around `folio bench` (src/folio/bench.py); the same options, the same JSON
lines (one per case, both paths and their ratios):

    flock /tmp/folio/cpu.lock python benchmarks/train_speed.py
    flock /tmp/folio/cpu.lock python benchmarks/train_speed.py --cases seed_bpe --steps 40
    flock /tmp/folio/cpu.lock python benchmarks/train_speed.py --cases "" --quality
"""

from __future__ import annotations

import sys

from folio.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
