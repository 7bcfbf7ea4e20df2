"""The OpenAI-compatible request and response shapes: checking a request body field by field
(every mistake is an `ApiError` with the status code and message OpenAI would give), a chat
request's prompt (the run's chat template, ending at its end-of-turn token; for a base model
the turns joined into a script), and the completion / chunk objects.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from folio.data import chat as template
from folio.data.tokenizer import Tokenizer
from folio.errors import FolioError
from folio.infer.sample import encode_prompt
from folio.store.rundir import RunInfo

# Fields OpenAI clients may send that a small base model has no use for: accepted, ignored.
IGNORED_FIELDS = {"user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                  "top_logprobs", "echo", "suffix", "best_of", "metadata", "store",
                  "service_tier", "parallel_tool_calls", "response_format"}
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                 "stream", "stream_options", "n"}
ROLES = ("system", "developer", "user", "assistant")
CHAT_STOP = "\n\n"  # a base model's chat answer ends at the first blank line unless `stop` is given
MAX_STOP = 4
SEED_LIMIT = 2**63  # seeds are 64-bit signed integers (torch.Generator takes seed + choice)


class ApiError(Exception):
    """A request the server refuses, as OpenAI's `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Limits:
    max_tokens: int
    max_prompt_chars: int
    max_n: int


@dataclass
class CompletionRequest:
    """One checked request to /v1/completions or /v1/chat/completions."""

    model: str
    prompt: str
    chat: bool
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    messages: list[dict[str, str]] | None = None  # chat: the checked turns


# ---------------------------------------------------------------------------- parsing

def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object of valid Unicode (any other body is a 400)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # nested deeper than the parser's recursion limit
        raise ApiError(400, "the request body is nested too deeply to parse") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if not _valid_unicode(body):
        raise ApiError(400, "the request body has a string with an unpaired surrogate "
                       "(\\ud800-\\udfff); send valid Unicode")
    return body


def _valid_unicode(value: Any) -> bool:
    """Whether every string (and key) in a parsed JSON value is encodable as UTF-8 (JSON's
    \\u escapes can spell lone surrogates, which no tokenizer or response can take). A
    walk without recursion: json.loads accepts nesting deeper than Python's stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
    return True


def parse_request(body: dict[str, Any], chat: bool, limits: Limits) -> CompletionRequest:
    """Check every field; the first problem raises an ApiError naming the field."""
    own = {"messages"} if chat else {"prompt"}
    extra = {"max_completion_tokens"} if chat else set()
    unknown = sorted(set(body) - COMMON_FIELDS - IGNORED_FIELDS - own - extra)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}", param=unknown[0])
    body = {k: v for k, v in body.items() if v is not None}  # null means "the default"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the name of a run from GET /v1/models",
                       param="model")
    messages = chat_messages(body.get("messages")) if chat else None
    prompt = join_chat(messages) if messages is not None else _prompt(body.get("prompt"))
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(400, f"the prompt has {len(prompt)} characters; this server accepts at "
                       f"most {limits.max_prompt_chars}", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    default_tokens = min(limits.max_tokens, 256 if chat else 16)  # OpenAI's default is 16
    max_tokens = _int(body, key, default_tokens, 1, limits.max_tokens)
    stop = _stop(body.get("stop"))
    stream = _bool(body, "stream", False)
    options = body.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                       param="stream_options")
    if options and not stream:
        raise ApiError(400, "'stream_options' is only allowed with stream=true",
                       param="stream_options")
    return CompletionRequest(
        model=model, prompt=prompt, chat=chat, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=_int(body, "top_k", None, 1, None),
        stop=stop, seed=_int(body, "seed", None, -SEED_LIMIT, SEED_LIMIT - 1), stream=stream,
        include_usage=_bool(options, "include_usage", False),
        n=_int(body, "n", 1, 1, limits.max_n), messages=messages)


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """The turns of a chat request, checked: {"role", "content" (text), "name"}."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'",
                           param=where)
        if m.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}",
                           param=f"{where}.role")
        name = m.get("name") or m["role"].upper()
        if not isinstance(name, str):
            raise ApiError(400, f"{where}.name must be a string", param=f"{where}.name")
        out.append({"role": m["role"], "content": _content(m.get("content"), where),
                    "name": name})
    return out


def join_chat(messages: list[dict[str, str]]) -> str:
    """Checked chat turns as one plain prompt for a base model, in the layout of a play script:

    each turn is `NAME:\n<content>\n\n` (NAME is the message's `name`, else its role in
    capitals), and the prompt ends with `ASSISTANT:\n` for the model to continue.
    """
    return "".join(f"{m['name']}:\n{m['content']}\n\n" for m in messages) + "ASSISTANT:\n"


def chat_prompt(req: CompletionRequest, tokenizer: Tokenizer, info: RunInfo, strict: bool
                ) -> tuple[list[int], list[str]]:
    """A chat request's prompt ids and stop strings for a run. With a chat template: the
    turns rendered by it ("developer" counts as "system"), and the end-of-turn and role
    tokens' texts as stops (each decodes to its text, so the answer ends there). For a base
    model: the script of join_chat, ending at a blank line unless `stop` is given; or a 400
    if `strict`.
    """
    assert req.messages is not None
    if info.chat_template is None:
        if strict:
            raise ApiError(400, f"the model {req.model!r} has no chat template (a base model) "
                           "and this server runs with --strict_template=True; use "
                           "/v1/completions, or a run finetuned with --task=chat",
                           param="model", code="no_chat_template")
        return encode_or_400(lambda: _encode(tokenizer, req.prompt)), req.stop or [CHAT_STOP]
    try:
        template.check_record(info.chat_template, f"run {req.model!r}")
    except FolioError as e:
        raise ApiError(400, str(e), param="model", code="unknown_chat_template") from None
    turns = [{"role": "system" if m["role"] == "developer" else m["role"],
              "content": m["content"]} for m in req.messages]
    ids = encode_or_400(lambda: template.prompt_ids(tokenizer, turns))
    return ids, [*req.stop, *template.REPLY_STOPS[:-1]]  # (<|endoftext|> ends it anyway)


def encode_or_400(encode: Callable[[], list[int]]) -> list[int]:
    """encode(), or a 400 naming what the vocabulary cannot encode."""
    try:
        return encode()
    except FolioError as e:
        raise ApiError(400, str(e), param="messages", code="bad_prompt") from None


def _encode(tokenizer: Tokenizer, prompt: str) -> list[int]:
    return encode_prompt(tokenizer, prompt)


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be a string (or a list of text parts)",
                   param=f"{where}.content")


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or a list of one string)",
                       param="prompt")
    return prompt


def _stop(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} "
                       "non-empty strings", param="stop")
    return stops


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false, not {value!r}", param=key)
    return value


def _int(body: dict[str, Any], key: str, default: int | None, low: int | None,
         high: int | None) -> Any:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be an integer, not {value!r}", param=key)
    if low is not None and value < low:
        raise ApiError(400, f"'{key}'={value} is too small; the minimum is {low}", param=key)
    if high is not None and value > high:
        raise ApiError(400, f"'{key}'={value} is too large; this server allows at most {high}",
                       param=key)
    return value


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float,
            open_low: bool = False) -> float:
    value = body.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be a number, not {value!r}", param=key)
    if not (low < value if open_low else low <= value) or not value <= high:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"'{key}'={value} is out of range; expected a number in {interval}",
                       param=key)
    return float(value)


# ---------------------------------------------------------------------------- responses

def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(req: CompletionRequest, id: str, created: int, texts: list[str],
               reasons: list[str], use: dict[str, int]) -> dict[str, Any]:
    """The whole (non-streamed) answer."""
    if req.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t},
                    "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
    else:
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
    return {"id": id, "object": "chat.completion" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": choices, "usage": use,
            "system_fingerprint": None}


def chunk(req: CompletionRequest, id: str, created: int, index: int, text: str | None,
          reason: str | None = None, role: bool = False) -> dict[str, Any]:
    """One server-sent event of a stream: a piece of choice `index`, or its finish reason."""
    if req.chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
    return {"id": id, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": [choice],
            "system_fingerprint": None}


def usage_chunk(req: CompletionRequest, id: str, created: int, use: dict[str, int]
                ) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {"id": id, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": [], "usage": use,
            "system_fingerprint": None}


def now() -> int:
    return int(time.time())


def sse(obj: dict[str, Any] | str) -> bytes:
    """One server-sent event line pair (`data: ...\\n\\n`)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
