"""The chat template: conversations (OpenAI's messages) as token ids, and which of them are
the assistant's. One rendering, used by training data prep, `folio chat`, the server and the
Hugging Face export (whose Jinja `chat_template`, JINJA below, renders the same text).

A conversation is rendered as

    <|endoftext|><|system|>CONTENT<|end|><|user|>CONTENT<|end|><|assistant|>CONTENT<|end|>...

(the end-of-text token starts each conversation, and separates packed ones in training); a
prompt for a reply ends with `<|assistant|>`, and the reply ends at `<|end|>`. The role and
end tokens are special tokens (data/bpe_files.py's SPECIAL_TOKENS, which `folio tokenizer
train` reserves); a vocabulary without them gets them added (tokenizer.with_special_tokens).
Contents are encoded as ordinary text: a literal "<|end|>" typed in a message is not the token.
The assistant's tokens, trained on, are each assistant content and its `<|end|>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from folio.data.bpe_files import SPECIAL_TOKENS
from folio.data.tokenizer import Tokenizer, special_ids, with_special_tokens
from folio.errors import DataError

NAME = "folio-chat-1"  # the template's name in run.json / meta.json; a new layout, a new name
ROLES = ("system", "user", "assistant")
START, END = "<|endoftext|>", "<|end|>"
GENERATION_PROMPT = "<|assistant|>"
# where a reply ends: its end of turn; also a role token or the start of a conversation, should
# a model skip the end and go on with the next turn
REPLY_STOPS = (END, *(f"<|{role}|>" for role in ROLES), START)
# transformers' apply_chat_template renders this to exactly render_text's string
JINJA = ("{{ '<|endoftext|>' }}{% for message in messages %}"
         "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


class ChatError(DataError):
    """A conversation the template cannot render (bad shape, unknown role, no assistant)."""


@dataclass(frozen=True)
class Segment:
    text: str
    special: bool  # one special token (its name), else ordinary text
    assistant: bool  # the assistant's: carries the loss in training


def role_token(role: str) -> str:
    return f"<|{role}|>"


def check_messages(messages: Any, need_assistant: bool = False) -> list[dict[str, str]]:
    """`messages` checked: a non-empty list of {"role": system|user|assistant, "content": str}
    (other keys ignored); with `need_assistant`, at least one assistant turn. A ChatError
    naming the first problem otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}] is not an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}] has role {role!r}; expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content is not a string")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise ChatError("the conversation has no assistant turn (nothing to learn from)")
    return out


def segments(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
             ) -> list[Segment]:
    """The rendered conversation as special tokens and texts, in order (messages checked)."""
    out = [Segment(START, True, False)]
    for m in messages:
        mine = m["role"] == "assistant"
        out.append(Segment(role_token(m["role"]), True, False))
        if m["content"]:
            out.append(Segment(m["content"], False, mine))
        out.append(Segment(END, True, mine))
    if add_generation_prompt:
        out.append(Segment(GENERATION_PROMPT, True, False))
    return out


def render_text(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
                ) -> str:
    """The conversation as one string, special tokens written by name (what JINJA renders)."""
    return "".join(s.text for s in segments(messages, add_generation_prompt))


def encode(tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
           add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, mask): mask[i] is 1 where ids[i] is the assistant's. `tokenizer` must have
    the template's special tokens (chat_tokenizer); a character it lacks is a DataError."""
    ids_of = special_ids(tokenizer)
    ids: list[int] = []
    mask: list[int] = []
    for s in segments(messages, add_generation_prompt):
        if s.special:
            if s.text not in ids_of:
                raise ChatError(f"the tokenizer has no {s.text} token; prepare the "
                                "conversations with --format=chat")
            part = [ids_of[s.text]]
        else:
            part = tokenizer.encode(s.text)
        ids += part
        mask += [int(s.assistant)] * len(part)
    return ids, mask


def prompt_ids(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """The ids of a conversation so far, ending with the assistant's role token."""
    return encode(tokenizer, messages, add_generation_prompt=True)[0]


def chat_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with every token the template uses (added after its vocabulary if not)."""
    return with_special_tokens(tokenizer, SPECIAL_TOKENS)


def stop_ids(tokenizer: Tokenizer) -> set[int]:
    """The ids of REPLY_STOPS: a reply ends before any of them."""
    found = special_ids(tokenizer)
    if END not in found:
        raise ChatError(f"the tokenizer has no {END} token; this run has no chat template")
    return {found[t] for t in REPLY_STOPS if t in found}


def record() -> dict[str, Any]:
    """The template as meta.json and run.json record it (`chat_template`)."""
    return {"name": NAME, "roles": list(ROLES), "special_tokens": list(SPECIAL_TOKENS),
            "jinja": JINJA}


def check_record(rec: Any, where: str) -> None:
    """A recorded template this folio renders; anything else is a one-line error."""
    name = rec.get("name") if isinstance(rec, dict) else None
    if name != NAME:
        raise ChatError(f"{where} records chat template {name!r}; this folio renders "
                        f"{NAME!r} only: upgrade folio")


def split_counts(n: int, val_fraction: float) -> int:
    """How many of n conversations go to val: at least one, leaving at least one to train."""
    return min(n - 1, max(1, round(n * val_fraction)))


def val_choice(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """A fixed random choice of the conversations that are val (a boolean (n,) array)."""
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:split_counts(n, val_fraction)]] = True
    return chosen
