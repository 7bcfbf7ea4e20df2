"""Random (B, T) batches from a prepared dataset's memory-mapped token file.

Each loader owns a seeded torch.Generator, so the data stream is reproducible, differs per
rank, and resumes exactly from `state_dict()`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from folio.errors import DataError


def open_tokens(dataset_dir: Path, split: str, meta: dict) -> np.memmap:
    """The split's tokens as a read-only memmap, checked against meta.json's count."""
    path = dataset_dir / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    if not path.is_file():
        raise DataError(f"{path} is missing; re-run `folio prepare`")
    size = path.stat().st_size
    expected = meta.get(f"{split}_tokens")
    if size % dtype.itemsize or (expected is not None and size // dtype.itemsize != expected):
        raise DataError(f"{path} is truncated or corrupt ({size} bytes, expected "
                        f"{expected} {dtype.name} tokens); re-run `folio prepare`")
    return np.memmap(path, dtype=dtype, mode="r")


def check_split_length(tokens: np.ndarray, block_size: int, name: str) -> None:
    """A split must hold at least one window of block_size+1 tokens."""
    if len(tokens) <= block_size:
        raise DataError(f"the {name} split has {len(tokens)} tokens, fewer than "
                        f"block_size+1={block_size + 1}; lower block_size or add text")


class Loader:
    """Draws batches of block_size+1 token windows at random offsets of one split."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int,
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
