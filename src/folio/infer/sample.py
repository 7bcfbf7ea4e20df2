"""Text from a trained run: `load` a model, `generate` streamed text; `folio sample` on top.

Sampling is temperature / top-k / top-p over the real vocabulary only; stop strings and the
GPT-2 end-of-text token end a sample; pieces are whole UTF-8 characters.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from folio.config import SampleConfig
from folio.data.tokenizer import Tokenizer
from folio.errors import ConfigError, DataError
from folio.infer.decode import CachedDecoder, RecomputeDecoder, slide
from folio.machine.device import dtype_name, resolve_device, resolve_dtype, topk
from folio.model.gpt import GPT
from folio.speed.decoding import for_decoding
from folio.store.rundir import RunInfo
from folio.store.sources import load_model

SEPARATOR = "\n---------------\n"  # between samples on stdout, as nanoGPT prints


# ---------------------------------------------------------------------------- loading

def load(run_dir: str | Path, device: str = "auto", dtype: str = "auto",
         compile: bool = False) -> tuple[GPT, Tokenizer]:
    """The model (eval mode, on `device` in `dtype`) and tokenizer of a folio or nanoGPT run."""
    model, tokenizer, _ = load_run(run_dir, device, dtype, compile)
    return model, tokenizer


def load_run(run_dir: str | Path, device: str = "auto", dtype: str = "auto",
             compile: bool = False) -> tuple[GPT, Tokenizer, RunInfo]:
    """`load` plus the run's info (what its run.json says)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model, tokenizer, info = load_model(run_dir, torch_device)
    model.to(dtype=torch_dtype)
    if compile:
        model.compile(dynamic=True)  # one graph for every window and cache length
    return model, tokenizer, info


# ---------------------------------------------------------------------------- sampling

def check_sampling(temperature: float, top_k: int | None, top_p: float,
                   stop: Sequence[str] = ()) -> None:
    """Reject settings no sampler can honour, with the fix in the message."""
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} is negative; use 0 for greedy or a "
                          "positive value such as 0.8")
    if top_k is not None and top_k <= 0:
        raise ConfigError(f"top_k={top_k} must be a positive integer (or None to keep all "
                          "tokens)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]; 1.0 disables nucleus sampling")
    if any(not s for s in stop):
        raise ConfigError("stop strings must not be empty; drop the empty --stop")


def top_k_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits (..., V) and their token ids, largest first (k > V keeps all)."""
    return topk(logits, min(k, logits.size(-1)))


def top_p_candidates(values: torch.Tensor, ids: torch.Tensor, p: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest prefix of logits `values` (sorted, largest first) whose mass reaches p."""
    probs = F.softmax(values, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # the top token always has 0 before it
    n = max(1, int((mass_before < p).sum()))
    return values[:n], ids[:n]


def sample_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
                 generator: torch.Generator | None) -> int:
    """One token id from logits (V,): argmax at temperature 0, else a top-k/top-p draw."""
    return sample_tokens(logits[None], [(temperature, top_k, top_p)], [generator])[0]


Settings = tuple[float, int | None, float]  # temperature, top_k, top_p


def sample_tokens(logits: torch.Tensor, settings: Sequence[Settings],
                  generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token id per row of logits (B, V), row b drawn with settings[b] and generators[b].

    Rows with the same settings go through top-k and the softmax together (one call for all,
    each row computed on its own: a row gets the token it gets alone); each row then draws
    with its own generator. Drawing among the candidates only (not masking the whole
    vocabulary) keeps a GPT-2 step from softmaxing and sampling 50,257 entries.
    """
    groups: dict[Settings, list[int]] = {}
    for row, knobs in enumerate(settings):
        groups.setdefault(knobs, []).append(row)
    tokens = [0] * len(settings)
    for knobs, rows in groups.items():
        part = logits if len(rows) == logits.size(0) else logits[rows]
        drawn = _sample_rows(part, *knobs, [generators[row] for row in rows])
        for row, token in zip(rows, drawn, strict=True):
            tokens[row] = token
    return tokens


def _sample_rows(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
                 generators: list[torch.Generator | None]) -> list[int]:
    """`sample_tokens` for rows (G, V) of one setting."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1).tolist()
    values, ids = logits, None  # ids None: values covers the whole vocabulary, in order
    if top_k is not None and top_k < values.size(-1):
        values, ids = top_k_candidates(values, top_k)  # scaling by 1/T keeps the order
    values = values / temperature
    if top_p < 1.0:  # each row keeps a prefix of its own length: drawn one by one
        if ids is None:
            values, ids = torch.sort(values, descending=True)
        rows = [top_p_candidates(v, i, top_p) for v, i in zip(values, ids, strict=True)]
        return [int(i[draw(F.softmax(v, dim=-1).cpu()[None], [g])[0]])
                for (v, i), g in zip(rows, generators, strict=True)]
    choices = draw(F.softmax(values, dim=-1).cpu(), generators)  # (G,) positions in values
    return (choices if ids is None else ids.cpu().gather(1, choices[:, None])[:, 0]).tolist()


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One index per row of probs (G, n), row g drawn with generators[g]: exactly the draw of
    `torch.multinomial(probs[g], 1, generator=generators[g])` (which races exponential clocks:
    argmax of p / Exp(1) noise), the noise drawn row by row but the race run once for all rows.
    On the CPU with CPU generators: reproducible on every device (the ids go to the host
    anyway, to be printed)."""
    if probs.size(0) == 1:  # one row (a single stream): multinomial itself, fewer calls
        return torch.multinomial(probs, 1, generator=generators[0])[:, 0]
    noise = torch.empty_like(probs)
    for row, generator in zip(noise, generators, strict=True):
        row.exponential_(1, generator=generator)
    if probs.isnan().any():  # multinomial refuses these too; argmax would pick one
        raise RuntimeError("probability tensor contains nan")
    return (probs / noise).argmax(dim=-1)


# ---------------------------------------------------------------------------- text

class TextStream:
    """Token ids in, printable text out: whole UTF-8 characters, cut at the first stop string.

    Text that could be the start of a stop string is held back until it is decided.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stopped = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def push(self, token: int) -> str:
        """Text that is final after `token` (possibly empty)."""
        return self._release(self._decoder.decode(self.tokenizer.decode_bytes([token])))

    def finish(self) -> str:
        """The rest: held text and any incomplete character (as U+FFFD)."""
        return self._release(self._decoder.decode(b"", final=True), final=True)

    def _release(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = 0 if final else max((n for s in self.stop for n in range(1, len(s))
                                    if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt token ids; an empty prompt starts a GPT-2 model at end-of-text."""
    if not prompt:
        if tokenizer.eot_id is None:
            raise ConfigError("the prompt is empty; a character-level model needs at least one "
                              "character to start from, e.g. --start=\"\\n\" (the default)")
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode(prompt)
    except DataError as e:
        raise ConfigError(f"the prompt has {e}; use only characters of the training text"
                          ) from None


def read_prompt(start: str) -> str:
    """`--start` text, or the contents of the file named by `FILE:path`."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):]).expanduser()
    try:
        return path.read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--start=FILE:{path}: file not found; give an existing prompt "
                          "file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--start=FILE:{path}: cannot read it as UTF-8 text ({e})") from None


# ---------------------------------------------------------------------------- generation

def generate_tokens(model: GPT, prompt_ids: list[int], max_new_tokens: int,
                    temperature: float = 0.8, top_k: int | None = 200, top_p: float = 1.0,
                    generator: torch.Generator | None = None, use_cache: bool = True
                    ) -> Iterator[int]:
    """New token ids after prompt_ids, one at a time.

    The context is the last block_size tokens; when it overflows, the oldest SLIDE_FRACTION
    of the window is dropped (decode.py's `slide`). Cached and recomputed decoding see the
    same windows, so greedy output is identical either way.
    """
    block = model.config.block_size
    decode = CachedDecoder(model) if use_cache else RecomputeDecoder(model)
    window = list(prompt_ids[-block:])
    for _ in range(max_new_tokens):
        token = sample_token(decode(window), temperature, top_k, top_p, generator)
        yield token
        window.append(token)
        window = slide(window, block)


def generate(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
             temperature: float = 0.8, top_k: int | None = 200, top_p: float = 1.0,
             stop: Sequence[str] = (), seed: int | torch.Generator | None = None,
             use_cache: bool = True) -> Iterator[str]:
    """Text pieces generated after `prompt`, yielded as they are decided.

    Ends after max_new_tokens tokens, at the first stop string (not included) or at the
    end-of-text token. `seed` is an int, a torch.Generator (to continue one stream across
    calls) or None (torch's global RNG). Bad settings raise here, before any text.
    """
    check_sampling(temperature, top_k, top_p, stop)
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 0")
    prompt_ids = encode_prompt(tokenizer, prompt)
    generator = torch.Generator().manual_seed(seed) if isinstance(seed, int) else seed
    tokens = generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                             generator, use_cache)
    return _text_pieces(tokens, TextStream(tokenizer, stop), tokenizer.eot_id)


def _text_pieces(tokens: Iterator[int], stream: TextStream, eot_id: int | None
                 ) -> Iterator[str]:
    for token in tokens:
        if token == eot_id:
            break
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    tail = stream.finish()
    if tail:
        yield tail


# ---------------------------------------------------------------------------- CLI

def describe(cfg: SampleConfig, model: GPT, info: RunInfo, decoding: str) -> str:
    """The settings line printed on stderr before the samples."""
    weight = model.transformer.wte.weight
    where = f"iter {info.iter_num}"
    if info.best_val_loss is not None:
        where += f", val loss {info.best_val_loss:.4f}"
    return (f"folio: sampling {cfg.out_dir} ({where}, {model.num_params() / 1e6:.2f}M params) "
            f"on {weight.device} ({decoding}): "
            f"{cfg.num_samples} x {cfg.max_new_tokens} tokens, temperature {cfg.temperature}, "
            f"top_k {cfg.top_k}, top_p {cfg.top_p}, seed {cfg.seed}"
            + (f", stop {cfg.stop!r}" if cfg.stop else ""))


def run(cfg: SampleConfig) -> None:
    """`folio sample`: settings on stderr, only the samples (and separators) on stdout."""
    prompt = read_prompt(cfg.start)
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.stop)
    model, tokenizer, info = load_run(cfg.out_dir, cfg.device, cfg.dtype, cfg.compile)
    encode_prompt(tokenizer, prompt)  # a bad prompt fails before anything is printed
    loaded = model  # the parameters to count: a packed decoding copy holds none
    decoding = dtype_name(model.transformer.wte.weight.dtype)
    if not cfg.compile:
        model, choice = for_decoding(model, cfg.dtype,
                                              cfg.max_new_tokens * cfg.num_samples)
        decoding = choice.line
    print(describe(cfg, loaded, info, decoding), file=sys.stderr, flush=True)
    generator = torch.Generator().manual_seed(cfg.seed)  # one stream: samples differ
    out = sys.stdout
    for _ in range(cfg.num_samples):
        pieces = generate(model, tokenizer, prompt, cfg.max_new_tokens, cfg.temperature,
                          cfg.top_k, cfg.top_p, cfg.stop, generator)
        out.write(prompt)
        if cfg.stream:
            for piece in pieces:
                out.write(piece)
                out.flush()
        else:
            out.write("".join(pieces))
        out.write(SEPARATOR)
        out.flush()
