"""A folio tokenizer as llama.cpp's GGUF vocabulary, exactly, or a one-line refusal.

- char: a sentencepiece vocabulary (`tokenizer.ggml.model = llama`): one piece per character,
  a space spelled U+2581, no space prefix, which llama.cpp tokenizes per character for any
  Unicode text (a byte-level BPE without merges is not loadable there).
- byte-level BPE (gpt2, tiktoken:NAME, `folio tokenizer train` dirs, hf:PATH): llama.cpp's
  `gpt2` tokenizer model: the tokens in GPT-2's byte-level alphabet, one merge per token, and
  the pre-tokenizer (`tokenizer.ggml.pre`) whose regex is exactly the tokenizer's split
  pattern. llama.cpp picks that regex by name (src/llama-vocab.cpp); PRE_TOKENIZERS lists
  the patterns folio maps, each checked equivalent (possessive quantifiers, `\\s++$` before
  `\\s+(?!\\S)` and `'(?i:...)` versus the spelled-out contractions match the same pieces).
  tiktoken's cl100k_base has no exact one: its `\\s++$` keeps text-final whitespace holding a
  newline as one piece, which llama.cpp's `llama-bpe` splits at the newline. SmolLM2's
  Digits(individual_digits) then GPT-2's ByteLevel is `smollm`: `\\p{N}` isolated, then
  GPT-2's regex (the same ids on text, numbers and every \\p{N} character llama.cpp knows).

llama.cpp's character classes (src/unicode-data.cpp) are Unicode 15.1's, Hugging Face's
`tokenizers`' (its regex and Digits) Unicode 16's: a character new in 16 may split differently
under any of these names (a Garay digit after a space is one piece in llama.cpp's `smollm` and
`llama-bpe`, two in Hugging Face's), which changes the ids where a merge joins the two (a
space and a 4-byte character's lead byte).

A token no merge makes is found only by whole-piece lookup (tiktoken's, and llama.cpp's under
`llama-bpe`, which ignores merges for a piece in the vocabulary); a vocabulary holding one is
refused under a pre-tokenizer that always merges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from folio.data.bpe_files import GPT2_PATTERN, GPT4_PATTERN, byte_to_char, rank_merges
from folio.data.tokenizer import CharTokenizer, HFTokenizer, TiktokenBPE
from folio.errors import ConfigError

SPM_SPACE = "\u2581"  # how a sentencepiece vocabulary spells a space
# tiktoken's GPT-2 (r50k, p50k) pattern, the same pieces as GPT-2's own
R50K_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|"""
                r"""\s++$|\s+(?!\S)|\s""")
# Llama 3's (and tiktoken < 0.7's cl100k_base): folio's GPT4_PATTERN without possessives
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""",
    r"""\s+"""])
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                  r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
DIGITS = r"\p{N}"  # Hugging Face's Digits(individual_digits=true): each digit alone
Pattern = str | tuple[str, ...]  # a split pattern, or isolating patterns applied in turn
PRE_TOKENIZERS: dict[Pattern, str] = {  # split -> llama.cpp's pre-tokenizer with those regexes
    GPT2_PATTERN: "gpt-2", R50K_PATTERN: "gpt-2",
    GPT4_PATTERN: "llama-bpe", LLAMA3_PATTERN: "llama-bpe",
    O200K_PATTERN: "gpt-4o",
    (DIGITS, GPT2_PATTERN): "smollm",
}
IGNORES_MERGES = {"llama-bpe"}  # llama.cpp looks a whole piece up first under these
NEAREST = {CL100K_PATTERN: "; the nearest, llama-bpe, splits text-final whitespace holding a "
                           "newline where cl100k's \\s++$ keeps it whole"}


@dataclass
class Vocab:
    """What the GGUF file says about the tokenizer."""

    model: str  # tokenizer.ggml.model: llama (sentencepiece) or gpt2 (byte-level BPE)
    tokens: list[str]
    types: list[str]  # gguf.TokenType names
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    eot_id: int | None = None


def vocabulary(tokenizer: Any, vocab_size: int) -> Vocab:
    """`tokenizer` as llama.cpp reads it, `vocab_size` tokens long (ids the tokenizer does not
    use are unused placeholders), or a one-line ConfigError naming what would be needed."""
    if isinstance(tokenizer, CharTokenizer):
        vocab = char_vocab(tokenizer.chars)
    elif isinstance(tokenizer, TiktokenBPE):
        vocab = tiktoken_vocab(tokenizer)
    elif isinstance(tokenizer, HFTokenizer):
        vocab = hf_vocab(Path(tokenizer.path) / "tokenizer.json")
    else:
        raise ConfigError(f"cannot export a {tokenizer.kind!r} tokenizer as GGUF: folio writes "
                          "char and byte-level BPE vocabularies only (export --format hf "
                          "instead)")
    if len(vocab.tokens) > vocab_size:
        raise ConfigError(f"cannot export as GGUF: the tokenizer has {len(vocab.tokens):,} ids, "
                          f"the model {vocab_size:,}")
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[folio-unused-{i}]")
        vocab.types.append("UNUSED")
    vocab.eot_id = tokenizer.eot_id
    return vocab


def char_vocab(chars: list[str]) -> Vocab:
    if SPM_SPACE in chars:
        raise ConfigError("cannot export this character vocabulary as GGUF: it holds "
                          f"{SPM_SPACE!r} (U+2581), which llama.cpp's sentencepiece vocabulary "
                          "reads as a space")
    return Vocab("llama", [SPM_SPACE if c == " " else c for c in chars], ["NORMAL"] * len(chars))


def pre_tokenizer(pattern: Pattern, what: str, ignore_merges: bool | None) -> str:
    """llama.cpp's name for `pattern`; `ignore_merges`: whether the tokenizer looks whole
    pieces up first (None: it does not matter, every token being one merge)."""
    pre = PRE_TOKENIZERS.get(pattern)
    if pre is None:
        raise ConfigError(f"cannot export {what} as GGUF: llama.cpp names its split pattern, and "
                          f"none it knows is exactly {pattern!r}{NEAREST.get(pattern, '')}; "
                          "it needs a llama.cpp pre-tokenizer with this regex (export --format "
                          "hf instead)")
    if ignore_merges is not None and ignore_merges != (pre in IGNORES_MERGES):
        looks = "looks whole pieces up before merging" if ignore_merges else "always merges"
        raise ConfigError(f"cannot export {what} as GGUF: it {looks}, and llama.cpp's {pre} "
                          "pre-tokenizer for its split pattern does not; it needs a llama.cpp "
                          "pre-tokenizer with the same regex and merge rule")
    return pre


def tiktoken_vocab(tokenizer: TiktokenBPE) -> Vocab:
    """gpt2, tiktoken:NAME and trained dirs: tokens from the ranks, one merge each."""
    enc = tokenizer._enc
    ranks: dict[bytes, int] = enc._mergeable_ranks
    what = f"the {tokenizer.kind} tokenizer" + (f" {tokenizer.name}"
                                                 if getattr(tokenizer, "name", None) else "")
    pre_tokenizer(enc._pat_str, what, None)  # an unknown pattern is refused before the work
    pairs, whole_only = rank_merges(ranks)
    if not pairs:
        raise ConfigError(f"cannot export {what} as GGUF: it has no merges, and llama.cpp "
                          "loads no byte-level BPE without them")
    pre = pre_tokenizer(enc._pat_str, what, True if whole_only else None)
    to_str = byte_to_char()

    def text(token: bytes) -> str:
        return "".join(to_str[b] for b in token)

    by_id = {i: (text(t), "NORMAL") for t, i in ranks.items()}
    by_id.update({i: (t, "CONTROL") for t, i in enc._special_tokens.items()})
    return Vocab("gpt2", *dense(by_id), pre=pre,
                 merges=[f"{text(a)} {text(b)}" for a, b in pairs])


def hf_vocab(file: Path) -> Vocab:
    """hf:PATH: a byte-level BPE tokenizer.json with a split llama.cpp names."""
    what = f"the tokenizer {file}"
    data = json.loads(file.read_text("utf-8"))
    model = data.get("model") or {}
    needs = [
        (model.get("type") == "BPE", "a BPE model"),
        (not model.get("byte_fallback") and not model.get("continuing_subword_prefix")
         and not model.get("end_of_word_suffix"), "no byte fallback or subword affixes"),
        (data.get("normalizer") is None, "no normalizer (llama.cpp's gpt2 vocabulary has none)"),
        ((data.get("decoder") or {}).get("type") == "ByteLevel", "a ByteLevel decoder"),
        (bool(model.get("merges")), "merges"),
    ]
    for ok, needed in needs:
        if not ok:
            raise ConfigError(f"cannot export {what} as GGUF: llama.cpp's byte-level BPE "
                              f"needs {needed}")
    pre = pre_tokenizer(hf_pattern(data.get("pre_tokenizer"), what), what,
                        bool(model.get("ignore_merges")))
    by_id = {i: (t, "NORMAL") for t, i in model["vocab"].items()}
    by_id.update({t["id"]: (t["content"], "CONTROL" if t.get("special") else "USER_DEFINED")
                  for t in data.get("added_tokens") or []})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return Vocab("gpt2", *dense(by_id), pre=pre, merges=merges)


def hf_pattern(pre: Any, what: str) -> Pattern:
    """The split of a byte-level pre-tokenizer: GPT-2's ByteLevel (its own regex), optionally
    after Digits(individual_digits=true) (each digit alone, then GPT-2's regex between them),
    or one isolating regex Split then a ByteLevel without regex."""
    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    digits = [{"type": "Digits", "individual_digits": True}]
    if steps[:-1] in ([], digits) and gpt2_byte_level(steps[-1:]):
        return (DIGITS, GPT2_PATTERN) if steps[:-1] else GPT2_PATTERN
    if len(steps) == 2 and [s.get("type") for s in steps] == ["Split", "ByteLevel"]:
        split, byte_level = steps
        if "Regex" in (split.get("pattern") or {}) and split.get("behavior") == "Isolated" \
                and not split.get("invert") and not byte_level.get("use_regex", True) \
                and not byte_level.get("add_prefix_space"):
            return split["pattern"]["Regex"]
    raise ConfigError(f"cannot export {what} as GGUF: llama.cpp's byte-level BPE needs a "
                      "pre-tokenizer that is GPT-2's ByteLevel or one regex Split then a "
                      "ByteLevel without regex or prefix space, or Digits(individual_digits) "
                      "then GPT-2's ByteLevel")


def gpt2_byte_level(steps: list[Any]) -> bool:
    """Whether `steps` is one ByteLevel splitting with GPT-2's regex, no prefix space."""
    return len(steps) == 1 and steps[0].get("type") == "ByteLevel" and \
        steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space")


def dense(by_id: dict[int, tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(tokens, types) for ids 0..max: a gap is an unused placeholder."""
    size = max(by_id) + 1
    pairs = [by_id.get(i, (f"[folio-unused-{i}]", "UNUSED")) for i in range(size)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def eot_text(vocab: Vocab) -> str | None:
    """The end-of-text token as text (the Modelfile's stop word), if there is one."""
    return None if vocab.eot_id is None else vocab.tokens[vocab.eot_id]
