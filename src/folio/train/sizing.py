"""The model a time budget can train best (`folio train --time=T` with no shape given).

One dial, as in nanochat: depth d gives a model of d layers, 32·d wide, heads of 32 (d = 4 is
nanoGPT README's CPU model). The budget buys FLOPs: its seconds times this device's measured
matmul peak times a typical utilisation. The chosen depth is the largest whose training tokens
in the budget reach TOKENS_PER_PARAM per parameter, the ratio benchmarks/size_sweep.py found
best on tiny Shakespeare (docs/size_sweep.png). A small corpus seen many times overfits: a run
that sees its data more than EPOCHS_BEFORE_DECAY times gets weight decay, one past
EPOCHS_BEFORE_DROPOUT times dropout too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEPTHS = range(2, 13)
HEAD_DIM = 32
UTILISATION = 0.25  # the share of the measured matmul peak a training step reaches (MFU)
TOKENS_PER_PARAM = 8.0  # benchmarks/size_sweep.py on tiny Shakespeare, char, a 2-core Zen 3
# (predicted tokens per parameter): at 60 s and 120 s depth 2 won (25 and 50 per parameter)
# over depth 3 (2.6 and 5.2; 1.634 against 1.619 at 120 s), so depth 3 starts above ~8
EPOCHS_BEFORE_DROPOUT = 20.0  # nanoGPT's GPU char config: dropout 0.2 for ~80 epochs; the sweep
# (no dropout) never saw a run past 5 epochs overfit
DROPOUT = 0.1
EPOCHS_BEFORE_DECAY = 2.0  # the 2-minute runs (4-5 epochs) gained from it; fewer: not measured
WEIGHT_DECAY = 0.1  # benchmarks/time_budget sweep at 10 minutes (3 x 96, 12 epochs): decay 0.05
# and 0.2 both took val from 1.544 to 1.506, dropout 0.1 made it worse (1.585)
BLOCK_SIZE = {"char": 256, "bpe": 64}  # context: tokens per sequence (char: 256 took the 2-minute
# run from 1.618 to 1.587 and the 10-minute one from 1.544 to 1.469 against 128, 2 x 64 and 3 x 96)
BATCH_SIZE = 16


@dataclass(frozen=True)
class Size:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    dropout: float
    weight_decay: float

    def settings(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)


def params(depth: int, vocab: int) -> int:
    """Parameters of the dial's model at `depth` (blocks plus an untied head and embedding)."""
    width = HEAD_DIM * depth
    return 12 * depth * width**2 + 2 * vocab * width


def flops_per_token(depth: int, vocab: int, block_size: int) -> float:
    """Training FLOPs per token (forward and backward; PaLM's estimate)."""
    return 6 * params(depth, vocab) + 12 * depth * HEAD_DIM * depth * block_size


def choose(budget_s: float, peak_flops: float, train_tokens: int, vocab: int
           ) -> tuple[Size, str]:
    """The size for `budget_s` seconds on a device of `peak_flops`, for a dataset of
    `train_tokens`; and why, in a few words for the first line."""
    kind = "char" if vocab < 1024 else "bpe"
    block = BLOCK_SIZE[kind]
    flops = budget_s * peak_flops * UTILISATION

    def tokens(d: int) -> float:
        return flops / flops_per_token(d, vocab, block)

    fitting = [d for d in DEPTHS if tokens(d) >= TOKENS_PER_PARAM * params(d, vocab)]
    depth = max(fitting, default=DEPTHS[0])
    epochs = tokens(depth) / max(1, train_tokens)
    dropout = DROPOUT if epochs > EPOCHS_BEFORE_DROPOUT else 0.0
    decay = WEIGHT_DECAY if epochs > EPOCHS_BEFORE_DECAY else 0.0
    size = Size(depth, depth, depth * HEAD_DIM, block, BATCH_SIZE, dropout, decay)
    against = " and ".join(([f"weight decay {decay}"] if decay else [])
                           + ([f"dropout {dropout}"] if dropout else []))
    why = (f"depth {depth}: {fmt(tokens(depth))} tokens fit the budget at "
           f"{peak_flops / 1e9:.0f} GFLOP/s, >= {TOKENS_PER_PARAM:.0f} per parameter "
           f"({params(depth, vocab) / 1e6:.2f}M)"
           + (f"; {epochs:.0f} epochs of the data, so {against}" if against else ""))
    return size, why


def fmt(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K" if n >= 1e3 else f"{n:.0f}"
