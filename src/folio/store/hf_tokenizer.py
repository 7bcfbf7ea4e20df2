"""Every folio tokenizer as Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json)
that `AutoTokenizer.from_pretrained(DIR)` loads and that encode text to folio's ids exactly.

- char: a BPE model without merges over the run's characters (id i is chars[i]), decoded by
  concatenation;
- gpt2 and tiktoken:NAME: byte-level BPE converted from tiktoken's ranks, one merge per token
  (the two parts tiktoken's own merging ends in), with tiktoken's pre-tokenizer pattern and
  whole-word lookup first (`ignore_merges`, as tiktoken does);
- hf:PATH: the run's tokenizer.json without its post-processor (folio adds no BOS/EOS).

Tokens a run added after its vocabulary (a chat template's roles, tokenizer.AddedTokens)
are added tokens of tokenizer.json with the same ids, and a chat run's template is
tokenizer_config.json's `chat_template` (data/chat.py's JINJA: apply_chat_template renders
the text and ids folio's template does).

folio encodes text as ordinary text; AutoTokenizer also maps a literal special token such as
"<|endoftext|>" in the text to its id. Decoding is the same either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from folio.data.bpe_files import TOKENIZER_FILE, byte_to_char, rank_merges
from folio.data.tokenizer import (
    GPT2_VOCAB_SIZE,
    AddedTokens,
    CharTokenizer,
    HFTokenizer,
    TiktokenBPE,
    gpt2_vocab_file,
)
from folio.errors import ConfigError
from folio.extras import need
from folio.store.hf import VOCAB_NOTE, transformers_module


def write_tokenizer(directory: Path, tokenizer: Any, max_length: int,
                    chat_template: str | None = None) -> None:
    """tokenizer.json and tokenizer_config.json for `tokenizer` (GPT-2 also gets vocab.json
    and merges.txt; a char vocabulary also folio_vocab.json, which folio reads back), with
    `chat_template` (Jinja) in tokenizer_config.json when given."""
    base = tokenizer.base if isinstance(tokenizer, AddedTokens) else tokenizer
    added = tokenizer.added if isinstance(tokenizer, AddedTokens) else []
    if base.kind == "gpt2":
        write_gpt2_tokenizer(directory, max_length, added)
        finish_config(directory, chat_template, None)
        return
    tokenizers = need("tokenizers", "hf", "Hugging Face tokenizer export")
    if isinstance(base, CharTokenizer):
        tok = char_tokenizer(tokenizers, base.chars)
        note = {"format_version": 1, "tokenizer": tokenizer.spec()}
        (directory / VOCAB_NOTE).write_text(json.dumps(note, indent=2, ensure_ascii=False) +
                                            "\n", encoding="utf-8")
    elif base.kind == "bpe":  # `folio tokenizer train` wrote its tokenizer.json
        tok = tokenizers.Tokenizer.from_file(str(Path(base.path) / TOKENIZER_FILE))
    elif isinstance(base, TiktokenBPE):
        tok = tiktoken_tokenizer(tokenizers, base._enc)
    elif isinstance(base, HFTokenizer):
        tok = tokenizers.Tokenizer.from_file(str(Path(base.path) / "tokenizer.json"))
        tok.post_processor = None  # folio adds no special tokens around the text
    else:
        raise ConfigError(f"cannot export a {tokenizer.kind!r} tokenizer to Hugging Face")
    add_tokens(tokenizers, tok, added, base.vocab_size)
    eos = None if tokenizer.eot_id is None else tok.id_to_token(tokenizer.eot_id)
    fast = transformers_module().PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, model_max_length=max_length,
        clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(directory))
    finish_config(directory, chat_template, "PreTrainedTokenizerFast")  # every version knows it


def finish_config(directory: Path, chat_template: str | None, tokenizer_class: str | None
                  ) -> None:
    """tokenizer_config.json with the tokenizer class and the chat template set."""
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text("utf-8"))
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    if chat_template:
        config["chat_template"] = chat_template
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")


def add_tokens(tokenizers: Any, tok: Any, added: list[str], first_id: int) -> None:
    """`added` as special added tokens of `tok`, at ids first_id, first_id + 1, ..."""
    if not added:
        return
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t in added])
    ids = [tok.token_to_id(t) for t in added]
    if ids != list(range(first_id, first_id + len(added))):
        raise ConfigError(f"cannot give the added tokens {added} the ids folio gives them "
                          f"({first_id}..): the tokenizer put them at {ids}")


def write_gpt2_tokenizer(directory: Path, max_length: int, added: list[str] = ()) -> None:
    """OpenAI's GPT-2 BPE files as vocab.json/merges.txt, plus transformers' tokenizer files
    (with `added` tokens after GPT-2's 50,257)."""
    for name, hf_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        (directory / hf_name).write_bytes(gpt2_vocab_file(name))
    transformers = transformers_module()
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(directory), local_files_only=True,
                                                         model_max_length=max_length)
    if added:
        tok.add_special_tokens({"additional_special_tokens": list(added)})
        ids = tok.convert_tokens_to_ids(list(added))
        if ids != list(range(GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE + len(added))):
            raise ConfigError(f"GPT-2's tokenizer put the added tokens {added} at {ids}")
    tok.save_pretrained(str(directory))


def char_tokenizer(tokenizers: Any, chars: list[str]) -> Any:
    """One token per character: BPE with the characters as its vocabulary and no merges."""
    model = tokenizers.models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[])
    tok = tokenizers.Tokenizer(model)
    tok.decoder = tokenizers.decoders.Fuse()  # tokens joined as they are, no spaces between
    return tok


def tiktoken_tokenizer(tokenizers: Any, enc: Any) -> Any:
    """A tiktoken Encoding as a byte-level BPE `tokenizers.Tokenizer` with the same ids."""
    ranks: dict[bytes, int] = enc._mergeable_ranks
    to_str = byte_to_char()
    vocab = {"".join(to_str[b] for b in token): rank for token, rank in ranks.items()}
    # a token no merge makes is reached by whole-word lookup only (ignore_merges), as tiktoken
    merges = [tuple("".join(to_str[b] for b in p) for p in pair)
              for pair in rank_merges(ranks)[0]]
    specials = dict(enc._special_tokens)
    vocab.update(specials)
    model = tokenizers.models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(enc._pat_str), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                            for s in sorted(specials, key=specials.get)])
    return tok

