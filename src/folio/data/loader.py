"""Random (B, T) batches from a prepared dataset's memory-mapped token file (or shards).

Each loader owns a seeded torch.Generator, so the data stream is reproducible, differs per
rank, and resumes exactly from `state_dict()`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from folio.errors import DataError


def open_tokens(dataset_dir: Path, split: str, meta: dict) -> np.ndarray | Shards:
    """The split's tokens, memory-mapped read-only and checked against meta.json's count.

    One file (`train.bin`), or the shards meta.json lists under `train_files` (read as their
    concatenation, in that order)."""
    dtype = np.dtype(meta["dtype"])
    names = meta.get(f"{split}_files") or [f"{split}.bin"]
    parts = [_open_part(dataset_dir / name, dtype) for name in names]
    tokens = parts[0] if len(parts) == 1 else Shards(parts)
    expected = meta.get(f"{split}_tokens")
    if expected is not None and len(tokens) != expected:
        where = dataset_dir / names[0] if len(names) == 1 else \
            f"the {split} shards in {dataset_dir} ({', '.join(names)})"
        raise DataError(f"{where} is truncated or corrupt ({len(tokens)} {dtype.name} tokens, "
                        f"expected {expected}); re-run `folio prepare`")
    return tokens


def _open_part(path: Path, dtype: np.dtype) -> np.memmap:
    if not path.is_file():
        raise DataError(f"{path} is missing; re-run `folio prepare`")
    size = path.stat().st_size
    if size % dtype.itemsize or size == 0:
        raise DataError(f"{path} is truncated or corrupt ({size} bytes of {dtype.name} tokens); "
                        "re-run `folio prepare`")
    return np.memmap(path, dtype=dtype, mode="r")


class Shards:
    """Several token files read as one array (their concatenation), for index arrays."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])  # (n_parts+1,)
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        part = np.searchsorted(self.starts, index, side="right") - 1  # same shape as index
        out = np.empty(index.shape, dtype=self.dtype)
        for p in np.unique(part):  # a window may span two shards
            where = part == p
            out[where] = self.parts[p][index[where] - self.starts[p]]
        return out


def check_split_length(tokens: np.ndarray | Shards, block_size: int, name: str) -> None:
    """A split must hold at least one window of block_size+1 tokens."""
    if len(tokens) <= block_size:
        raise DataError(f"the {name} split has {len(tokens)} tokens, fewer than "
                        f"block_size+1={block_size + 1}; lower block_size or add text")


class Loader:
    """Draws batches of block_size+1 token windows at random offsets of one split."""

    def __init__(self, tokens: np.ndarray | Shards, batch_size: int, block_size: int, seed: int,
                 device: torch.device, name: str = "train"):
        check_split_length(tokens, block_size, name)
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = np.arange(block_size + 1)  # (T+1,)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64 on the loader's device."""
        high = len(self.tokens) - self.block_size
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).numpy()
        windows = self.tokens[starts[:, None] + self.offsets]  # (B, T+1), one gather
        batch = torch.from_numpy(windows.astype(np.int64))
        x, y = batch[:, :-1], batch[:, 1:]
        if self.device.type == "cuda":  # pinned memory lets the copy overlap compute
            x, y = x.pin_memory(), y.pin_memory()
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
