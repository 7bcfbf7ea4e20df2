"""Random (B, T) batches from a prepared dataset's memory-mapped token file (or shards); for
a chat dataset (`folio prepare --format=chat`), windows that start at a conversation, with
the targets that are not the assistant's set to -1 (they carry no loss).

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

    truncated = 0  # (chat) conversations longer than a window

    def __init__(self, tokens: np.ndarray | Shards, batch_size: int, block_size: int, seed: int,
                 device: torch.device, name: str = "train"):
        check_split_length(tokens, block_size, name)
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = np.arange(block_size + 1)  # (T+1,)

    def starts(self) -> np.ndarray:
        """The batch's window offsets (B,)."""
        high = len(self.tokens) - self.block_size
        return torch.randint(high, (self.batch_size,), generator=self.generator).numpy()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64 on the loader's device."""
        x, y = read_windows(self.tokens, self.starts()[:, None] + self.offsets)
        if self.device.type == "cuda":  # pinned memory lets the copy overlap compute
            x, y = x.pin_memory(), y.pin_memory()
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def read_windows(tokens: np.ndarray | Shards | ChatTokens, where: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (B, T) int64 on the CPU, of the windows of token
    positions `where` (B, T+1) of a split as open_split returns it; in a chat split the targets
    that are not the assistant's are -1 (they carry no loss). Training, its evaluation and
    `folio eval` all read windows here."""
    batch = torch.from_numpy(tokens[where].astype(np.int64))  # one gather
    x, y = batch[:, :-1], batch[:, 1:]
    if isinstance(tokens, ChatTokens):
        y = y.masked_fill(torch.from_numpy(tokens.mask[where[:, 1:]] == 0), -1)
    return x, y


class ChatTokens:
    """A chat split: its token ids, the mask of the assistant's tokens (1) and where each
    conversation starts (its first token, the conversation start id `start_id`)."""

    def __init__(self, tokens: np.ndarray | Shards, mask: np.ndarray, start_id: int) -> None:
        self.tokens, self.mask, self.start_id = tokens, mask, start_id
        self.dtype = tokens.dtype
        self.conversations = np.flatnonzero(np.asarray(tokens[np.arange(len(tokens))])
                                            == start_id)  # (n,)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        return self.tokens[index]


def open_split(dataset_dir: Path, split: str, meta: dict) -> np.ndarray | Shards | ChatTokens:
    """A split of a prepared dataset: its tokens, or for a chat dataset (meta.json's format
    "chat") its tokens with the assistant mask and conversation starts."""
    tokens = open_tokens(dataset_dir, split, meta)
    if meta.get("format") != "chat":
        return tokens
    mask = _open_part(dataset_dir / f"{split}_mask.bin", np.dtype(np.uint8))
    if len(mask) != len(tokens):
        raise DataError(f"{dataset_dir / f'{split}_mask.bin'} has {len(mask)} entries for "
                        f"{len(tokens)} tokens; re-run `folio prepare --format=chat`")
    return ChatTokens(tokens, mask, int(meta["conversation_start_id"]))


class ChatLoader(Loader):
    """Windows of block_size+1 tokens that each start at a conversation: the conversations
    that follow are packed in after it (each opened by the start token; the trainer keeps
    attention within each, model/gpt.py's `documents`), a conversation longer than the window
    is cut at its end. Only
    windows with at least one assistant target are drawn, so no batch is without loss."""

    def __init__(self, tokens: ChatTokens, batch_size: int, block_size: int, seed: int,
                 device: torch.device, name: str = "train"):
        super().__init__(tokens, batch_size, block_size, seed, device, name)
        starts = tokens.conversations[tokens.conversations + block_size < len(tokens)]
        if len(starts) == 0 and len(tokens) > block_size:
            starts = np.array([0])
        scored = np.concatenate([[0], np.cumsum(tokens.mask, dtype=np.int64)])  # (N+1,)
        # assistant targets in positions start+1 .. start+block_size
        has_loss = scored[starts + block_size + 1] - scored[starts + 1] > 0
        self.window_starts = starts[has_loss]
        if len(self.window_starts) == 0:
            raise DataError(f"no conversation of the {name} split has an assistant token "
                            f"within its first {block_size + 1} tokens; raise block_size")
        ends = np.append(tokens.conversations[1:], len(tokens))
        self.truncated = int(np.sum(ends - tokens.conversations > block_size + 1))

    def starts(self) -> np.ndarray:
        pick = torch.randint(len(self.window_starts), (self.batch_size,),
                             generator=self.generator).numpy()
        return self.window_starts[pick]


def make_loader(tokens: np.ndarray | Shards | ChatTokens, batch_size: int, block_size: int,
                seed: int, device: torch.device, name: str = "train") -> Loader:
    """The loader for a split as open_split returns it."""
    kind = ChatLoader if isinstance(tokens, ChatTokens) else Loader
    return kind(tokens, batch_size, block_size, seed, device, name)
