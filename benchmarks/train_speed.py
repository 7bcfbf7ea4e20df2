"""Training speed on the CPU: nanoGPT's plain eager float32 path vs folio's default path.

A thin wrapper around `folio bench` (src/folio/train/bench.py); the same options, the same JSON
lines (one per case, both paths and their ratios). Run it on an otherwise idle machine:

    python benchmarks/train_speed.py
    python benchmarks/train_speed.py --cases seed_bpe --steps 40
    python benchmarks/train_speed.py --cases "" --quality
"""

from __future__ import annotations

import sys

from folio.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
