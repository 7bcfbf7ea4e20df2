"""Replies from a chat model (a run finetuned with --task=chat): the conversation rendered
with the run's chat template (data/chat.py), the reply decoded until the end-of-turn token;
`reply` for a program, `folio chat` for a person at a terminal.

A conversation longer than the model's block is seen through its last block_size tokens
(the sampler's sliding window), so the oldest turns fall out of view.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from itertools import takewhile
from pathlib import Path
from typing import Any, TextIO

import torch

from folio.config import ChatConfig
from folio.data import chat
from folio.data.tokenizer import Tokenizer
from folio.errors import ConfigError, DataError
from folio.infer.sample import TextStream, check_sampling, generate_tokens, load_run
from folio.model.gpt import GPT
from folio.speed.decoding import for_decoding
from folio.store.rundir import RunInfo

COMMANDS = "/reset starts over, /system TEXT sets the system message, /quit leaves"


def require_template(info: RunInfo, run_dir: str | Path) -> None:
    """A run with a chat template folio renders; a base model is a one-line error."""
    if info.chat_template is None:
        raise ConfigError(f"{run_dir} has no chat template: it is a base model. Finetune it on "
                          "conversations first (`folio prepare CONV.jsonl --format=chat "
                          f"--tokenizer={run_dir}`, then `folio train --init_from={run_dir} "
                          "--task=chat --dataset=NAME`), or use `folio sample`")
    chat.check_record(info.chat_template, f"{run_dir}/run.json")


def reply_tokens(model: GPT, tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
                 max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float = 1.0, generator: torch.Generator | None = None
                 ) -> Iterator[int]:
    """The reply's token ids after `messages` (checked), up to the end-of-turn token (not
    included) or max_new_tokens. A prompt the vocabulary cannot encode is a DataError."""
    check_sampling(temperature, top_k, top_p)
    prompt = chat.prompt_ids(tokenizer, chat.check_messages(list(messages)))
    stops = chat.stop_ids(tokenizer)
    tokens = generate_tokens(model, prompt, max_new_tokens, temperature, top_k, top_p,
                             generator)
    return takewhile(lambda t: t not in stops, tokens)


def reply_pieces(model: GPT, tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
                 max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float = 1.0, generator: torch.Generator | None = None
                 ) -> Iterator[str]:
    """The reply as text pieces (whole UTF-8 characters), as they are decided."""
    stream = TextStream(tokenizer)
    for token in reply_tokens(model, tokenizer, messages, max_new_tokens, temperature, top_k,
                              top_p, generator):
        piece = stream.push(token)
        if piece:
            yield piece
    tail = stream.finish()
    if tail:
        yield tail


def reply(model: GPT, tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
          max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
          top_p: float = 1.0, seed: int | None = None) -> str:
    """The assistant's next turn after `messages` (a list of {"role", "content"}), greedy by
    default: what a benchmark scores. `model` and `tokenizer` from folio.load of a chat run."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return "".join(reply_pieces(model, tokenizer, messages, max_new_tokens, temperature,
                                top_k, top_p, generator))


# ---------------------------------------------------------------------------- the terminal

class Conversation:
    """The turns so far, with the system message kept first."""

    def __init__(self, system: str = "") -> None:
        self.system = system
        self.turns: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


def run(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """`folio chat`: read a line, stream the reply, until /quit or the end of input. Replies
    go to stdout (one line each when piped); prompts and notes to stderr."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    model, tokenizer, info = load_run(cfg.run_dir, cfg.device, cfg.dtype)
    require_template(info, cfg.run_dir)
    model, choice = for_decoding(model, cfg.dtype, cfg.max_new_tokens * 16)
    interactive = stdin.isatty()
    print(f"folio: chatting with {cfg.run_dir} (iter {info.iter_num}, {choice.line}); "
          f"{COMMANDS}", file=sys.stderr, flush=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    talk = Conversation(cfg.system)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        command, _, rest = text.strip().partition(" ")
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            talk.turns = []
            print("folio: conversation reset", file=sys.stderr, flush=True)
            continue
        if command == "/system":
            talk.system = rest.strip()
            print(f"folio: system message {'set' if talk.system else 'cleared'}",
                  file=sys.stderr, flush=True)
            continue
        if command.startswith("/") or not text.strip():
            if command.startswith("/"):
                print(f"folio: unknown command {command}; {COMMANDS}", file=sys.stderr,
                      flush=True)
            continue
        talk.turns.append({"role": "user", "content": text})
        answer = []
        try:
            for piece in reply_pieces(model, tokenizer, talk.messages(), cfg.max_new_tokens,
                                      cfg.temperature, cfg.top_k, cfg.top_p, generator):
                answer.append(piece)
                stdout.write(piece)
                stdout.flush()
        except DataError as e:  # a character the vocabulary lacks: say so, keep talking
            talk.turns.pop()
            print(f"folio: cannot send that: {e}", file=sys.stderr, flush=True)
            continue
        stdout.write("\n")
        stdout.flush()
        talk.turns.append({"role": "assistant", "content": "".join(answer)})
