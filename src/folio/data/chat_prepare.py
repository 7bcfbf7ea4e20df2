"""`folio prepare CONV.jsonl --format=chat`: conversations -> `<data_dir>/<name>/` with
train.bin / val.bin (token ids, the chat template's rendering of each conversation, one after
another), train_mask.bin / val_mask.bin (uint8, 1 where the token is the assistant's) and
meta.json (`"format": "chat"`, the template, the tokenizer with its special tokens).

Reads a .jsonl[.gz|.zst] file of `{"messages": [{"role", "content"}, ...]}` lines, or an
`hf:NAME[:CONFIG]` dataset with a messages column (hub.py). A bad line (not JSON, no
messages list, an unknown role, a non-string content, no assistant turn, a character the
vocabulary lacks) is skipped and counted, the first few named by line number; with no usable
line at all the prepare is a one-line error. The val split is a fixed random choice of
conversations (val_fraction of them, at least one); a hub dataset's own split is kept. The
conversations are held in memory (chat sets are small) and the directory is written
atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from folio.config import AUTO, PrepareConfig
from folio.data import chat
from folio.data.hub import hub_source
from folio.data.sources import JSONL_FORMATS, _lines, file_format, open_binary
from folio.data.tokenizer import META_FORMAT_VERSION, Tokenizer, make_tokenizer, special_ids
from folio.errors import DataError
from folio.fsutil import atomic_dir, atomic_write_json

SPLIT_SEED = 2357
SHOWN_PROBLEMS = 5  # bad lines named on the console; all are counted
MASK_SUFFIX = "_mask.bin"
MESSAGES_FIELD = "messages"


@dataclass
class Conversations:
    """What was read: each usable conversation with where it came from, and the bad lines."""

    label: str
    items: list[tuple[int, int, list[dict[str, str]]]] = field(default_factory=list)
    # (split hint: -1 choose, 0 train, 1 val), line or row number, messages
    problems: list[str] = field(default_factory=list)
    rows: int = 0


def prepare_chat(cfg: PrepareConfig, tokenizer: Tokenizer | None = None) -> Path:
    """Read, check, encode and write the conversations; returns the dataset directory.
    `tokenizer`: a run's own (the CLI resolves `--tokenizer=RUN_DIR`), else cfg.tokenizer."""
    field_name = MESSAGES_FIELD if cfg.text_field == "text" else cfg.text_field
    convs, name = read_conversations(cfg, field_name)
    if tokenizer is None:
        tokenizer = make_tokenizer("char" if cfg.tokenizer == AUTO else cfg.tokenizer,
                                   alphabet(convs) if cfg.tokenizer in (AUTO, "char") else None)
    tokenizer = chat.chat_tokenizer(tokenizer)
    encoded = encode_all(convs, tokenizer)
    if not encoded:
        raise DataError(f"{convs.label} has no usable conversation ({len(convs.problems)} bad "
                        f"line(s); first: {convs.problems[0] if convs.problems else 'empty'})")
    splits = assign_splits(encoded, cfg.val_fraction or 0.1)
    out = Path(cfg.data_dir) / (cfg.name or name)
    meta = write_dataset(out, splits, tokenizer, convs, cfg)
    print_summary(meta, convs, out)
    return out


def read_conversations(cfg: PrepareConfig, field_name: str) -> tuple[Conversations, str]:
    """The conversations of a .jsonl file or a hub dataset, and the dataset's default name."""
    hub = hub_source(cfg.dataset, cfg.source, cfg.split, field_name, cfg.tokens,
                     cfg.val_fraction)
    if hub is not None:
        source, name = hub
        source.load()
        convs = Conversations(source.label)
        for split, part in enumerate(("train", "val")):
            for row, messages in enumerate(source.documents(part)):
                take(convs, split, row, messages, f"{part} row {row}")
        return convs, name
    path = Path(cfg.dataset).expanduser()
    if not path.is_file() or file_format(path) not in JSONL_FORMATS:
        raise DataError(f"--format=chat reads a .jsonl[.gz|.zst] file of {{\"messages\": [...]}} "
                        f"lines or an hf:NAME dataset; {cfg.dataset} is neither")
    convs = Conversations(str(path.resolve()))
    for number, record in jsonl_records(path):
        if isinstance(record, str):  # the line's problem
            convs.rows += 1
            convs.problems.append(f"line {number}: {record}")
            continue
        messages = record.get(field_name) if isinstance(record, dict) else None
        take(convs, -1, number, messages, f"line {number}")
    return convs, path.name[:-len(file_format(path))]


def take(convs: Conversations, split: int, number: int, messages: Any, where: str) -> None:
    """Keep a conversation that checks, or record its problem."""
    convs.rows += 1
    try:
        convs.items.append((split, number, chat.check_messages(messages, need_assistant=True)))
    except chat.ChatError as e:
        convs.problems.append(f"{where}: {e}")


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or a string saying why not) for each non-blank line."""
    with open_binary(path) as f:
        for number, raw in enumerate(_lines(f, path), start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield number, "not UTF-8"
            except json.JSONDecodeError as e:
                yield number, f"not valid JSON ({e.msg})"


def alphabet(convs: Conversations) -> list[str]:
    """The characters of every content, for a char vocabulary."""
    chars = {c for _, _, messages in convs.items for m in messages for c in m["content"]}
    return sorted(chars) or ["\n"]


Encoded = tuple[int, np.ndarray, np.ndarray]  # (split hint, ids, mask)


def encode_all(convs: Conversations, tokenizer: Tokenizer) -> list[Encoded]:
    """Each conversation's ids and mask; one with a character the vocabulary lacks is a bad
    line."""
    out = []
    for split, number, messages in convs.items:
        try:
            ids, mask = chat.encode(tokenizer, messages)
        except DataError as e:
            convs.problems.append(f"line {number}: {e}")
            continue
        out.append((split, np.asarray(ids, np.int64), np.asarray(mask, np.uint8)))
    return out


def assign_splits(encoded: list[Encoded], val_fraction: float
                  ) -> tuple[list[Encoded], list[Encoded]]:
    """(train, val) conversations: a hub split is kept; otherwise a fixed random choice."""
    if len(encoded) < 2:
        raise DataError(f"only {len(encoded)} usable conversation: a train and a val split "
                        "need at least 2")
    free = [e for e in encoded if e[0] == -1]
    val_free = chat.val_choice(len(free), val_fraction, SPLIT_SEED) if len(free) > 1 else []
    train = [e for e in encoded if e[0] == 0]
    val = [e for e in encoded if e[0] == 1]
    for e, is_val in zip(free, val_free, strict=True):
        (val if is_val else train).append(e)
    if not train or not val:
        raise DataError("the conversations do not give a non-empty train and val split; "
                        "add conversations or change --val_fraction")
    return train, val


def write_dataset(out: Path, splits: tuple[list[Encoded], list[Encoded]],
                  tokenizer: Tokenizer, convs: Conversations, cfg: PrepareConfig
                  ) -> dict[str, Any]:
    """Token and mask files of both splits and meta.json, into `out` atomically."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    meta: dict[str, Any] = {
        "format_version": META_FORMAT_VERSION, "format": "chat", "name": out.name,
        "tokenizer": tokenizer.spec(), "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size, "source": convs.label,
        "layout": "conversations", "chat_template": chat.record(),
        "conversation_start_id": special_ids(tokenizer)[chat.START],
        "val_fraction": cfg.val_fraction or 0.1, "rows": convs.rows,
        "skipped": len(convs.problems), "problems": convs.problems[:SHOWN_PROBLEMS]}
    with atomic_dir(out) as tmp:
        for name, part in zip(("train", "val"), splits, strict=True):
            ids = np.concatenate([e[1] for e in part]).astype(dtype)
            mask = np.concatenate([e[2] for e in part])
            ids.tofile(tmp / f"{name}.bin")
            mask.tofile(tmp / f"{name}{MASK_SUFFIX}")
            meta |= {f"{name}_tokens": len(ids), f"{name}_conversations": len(part),
                     f"{name}_assistant_tokens": int(mask.sum())}
        meta["documents"] = meta["train_conversations"] + meta["val_conversations"]
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def print_summary(meta: dict[str, Any], convs: Conversations, out: Path) -> None:
    kind = meta["tokenizer"]["kind"]
    added = meta["tokenizer"].get("added")
    print(f"conversations: {meta['train_conversations']:,} train, "
          f"{meta['val_conversations']:,} val, {meta['skipped']:,} skipped of "
          f"{convs.rows:,}\n"
          f"vocab size: {meta['vocab_size']:,} ({kind}"
          + (f", added {' '.join(added)}" if added else "") + ")\n"
          f"train has {meta['train_tokens']:,} tokens ({meta['train_assistant_tokens']:,} the "
          f"assistant's)\nval has {meta['val_tokens']:,} tokens "
          f"({meta['val_assistant_tokens']:,} the assistant's)")
    for problem in convs.problems[:SHOWN_PROBLEMS]:
        print(f"skipped {problem}")
    if len(convs.problems) > SHOWN_PROBLEMS:
        print(f"... and {len(convs.problems) - SHOWN_PROBLEMS:,} more skipped")
    print(f"wrote {out}/ (train.bin, val.bin, train{MASK_SUFFIX}, val{MASK_SUFFIX}, meta.json)")
