"""llama.cpp itself (llama-cpp-python, pinned in requirements-test.txt) runs folio's GGUF
files: its tokenization of tiny Shakespeare is folio's, and its greedy continuation (its own
sampler, temperature 0) is `folio sample --top_k=1`'s, for both recipes (the modern one with
and without QK-norm: llama.cpp's apertus and arcee), char and GPT-2 vocabularies, at f32; and
every other byte-level vocabulary (tiktoken:NAME, `folio tokenizer train` dirs, hf:PATH, a
SmolLM2-style digits-then-ByteLevel one) tokenizes as folio does, numbers included."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import llama_cpp
import pytest
import tiktoken
import torch
from test_export import RECIPES, SHAKESPEARE, TOKENIZERS, make_run, vocab_size

from folio.cli import main
from folio.data import bpe_files
from folio.data.tokenizer import gpt2_encoding, tokenizer_from_spec
from folio.infer.sample import generate_tokens
from folio.model.gpt import GPTConfig
from folio.store import gguf_vocab
from folio.store.hf_tokenizer import write_gpt2_tokenizer

PROMPT = "ROMEO:\nBut soft"
ODD_TEXT = ("café 🙂\u00a0x\r\n\t  \n\n 12345 'll 'S  ...\u200b e ﬁ THE End. e\u0301cole "
            "Ελληνικά Русский हिन्दी 日本語のテキスト ǅemal ʰa THEY'LL\n\n  ")
SLICE = SHAKESPEARE[:20_000]
NUMBERS = (" 12345 3.14 1,000,000 x2y 2024-12-04\n007 " +  # then every \p{N} of Unicode 14
           " ".join(c * 3 for c in map(chr, range(0x110000))
                    if unicodedata.category(c).startswith("N")))
pytestmark = pytest.mark.slow  # a llama.cpp model per test and 100 decoding steps: seconds


def llama(path: Path) -> llama_cpp.Llama:
    """The file in llama.cpp: float32 KV cache, one thread, small context, quiet."""
    f32 = 0  # GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1,
                           type_k=f32, type_v=f32, flash_attn=False, verbose=False)


def tokenize(llm: llama_cpp.Llama, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def export(run: Path, out: Path) -> Path:
    assert main(["export", str(run), "--format=gguf", str(out), "--dtype=f32"]) == 0
    return out


CASES = [  # (recipe, changes, vocabulary, tied head)
    ("nanogpt", {}, "char", True), ("nanogpt", {}, "gpt2", False),
    ("modern", {}, "char", False), ("modern", {}, "gpt2", True),
    ("modern", {"qk_norm": False}, "char", True), ("modern", {"qk_norm": False}, "gpt2", False),
]


@pytest.mark.parametrize("recipe, changes, kind, tie", CASES,
                         ids=[f"{r}{'-noqk' if c else ''}-{k}-{'tied' if t else 'untied'}"
                              for r, c, k, t in CASES])
def test_llama_cpp_tokenizes_and_continues_greedily_as_folio(tmp_path, recipe, changes, kind,
                                                             tie):
    config = GPTConfig(block_size=256, vocab_size=vocab_size(kind), n_layer=2, n_head=2,
                       n_embd=32, tie_head=tie, **{**RECIPES[recipe], **changes})
    model = make_run(tmp_path / "run", config, TOKENIZERS[kind])
    llm = llama(export(tmp_path / "run", tmp_path / "m.gguf"))
    tokenizer = tokenizer_from_spec(TOKENIZERS[kind])
    assert tokenize(llm, SLICE) == tokenizer.encode(SLICE)
    prompt = tokenizer.encode(PROMPT)
    assert tokenize(llm, PROMPT) == prompt
    with torch.no_grad():  # folio sample --top_k=1
        ours = list(generate_tokens(model, prompt, 100, temperature=1.0, top_k=1))
    stream = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
    theirs = [token for token, _ in zip(stream, range(100), strict=False)]
    assert theirs == ours
    text = llm.detokenize(theirs).decode("utf-8", errors="replace")
    assert text == tokenizer.decode(ours) and len(set(ours)) > 5


def ranks_run(root: Path, spec: dict) -> Path:
    """A tiny modern run over the vocabulary `spec` describes."""
    config = GPTConfig(block_size=64, vocab_size=tokenizer_from_spec(spec).vocab_size,
                       n_layer=1, n_head=2, n_embd=32, **RECIPES["modern"])
    make_run(root / "run", config, spec)
    return root / "run"


def fake_tiktoken(monkeypatch, name: str, pattern: str) -> dict:
    """tiktoken:NAME offline: GPT-2's ranks under NAME's split pattern (the pattern decides
    llama.cpp's pre-tokenizer; the ranks are the same kind of byte-level BPE)."""
    gpt2 = gpt2_encoding()
    enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=gpt2._mergeable_ranks,
                            special_tokens={"<|endoftext|>": 50256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda n: enc if n == name else None)
    return {"kind": "tiktoken", "name": name}


def trained_dir(root: Path, pattern: str, size: int = 3000) -> Path:
    """A `folio tokenizer train` directory: GPT-2's first merges, folio's special tokens."""
    ranks = {t: i for t, i in gpt2_encoding()._mergeable_ranks.items() if i < size}
    specials = {t: size + i for i, t in enumerate(bpe_files.SPECIAL_TOKENS)}
    (root / "tok").mkdir()
    bpe_files.write(root / "tok", ranks, specials, pattern, {"trained_on": "test"})
    return root / "tok"


def hf_dir(root: Path, source: Path) -> Path:
    """A local Hugging Face tokenizer dir holding `source`'s tokenizer.json."""
    (root / "hf").mkdir()
    (root / "hf" / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    return root / "hf"


def gpt2_fast_dir(root: Path) -> Path:
    """GPT-2's own tokenizer as transformers saves it (ByteLevel pre-tokenizer, its regex)."""
    (root / "g").mkdir()
    write_gpt2_tokenizer(root / "g", 64)
    return root / "g"


def smollm_dir(root: Path) -> Path:
    """A SmolLM2-style tokenizer.json: Digits(individual_digits) then GPT-2's ByteLevel. Its
    merges are learnt by GPT-2's ByteLevel alone from text rich in numbers, so they join digits
    (`12`, ` 1`) that only a split isolating each digit leaves apart."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    numbers = " ".join(str(i * 37) for i in range(3000))
    tok.train_from_iterator([SLICE, numbers, ODD_TEXT], trainer)
    assert {"12", "Ġ1"} <= set(tok.get_vocab())  # merges the digit split must not make
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    (root / "smol").mkdir()
    tok.save(str(root / "smol" / "tokenizer.json"))
    return root / "smol"


VOCABS = {  # name: (how to make the run's tokenizer spec, llama.cpp's pre-tokenizer)
    "tiktoken-r50k": (lambda root, mp: fake_tiktoken(mp, "r50k_base", gguf_vocab.R50K_PATTERN),
                      "gpt-2"),
    "tiktoken-o200k": (lambda root, mp: fake_tiktoken(mp, "o200k_base",
                                                      gguf_vocab.O200K_PATTERN), "gpt-4o"),
    "trained-gpt4": (lambda root, mp: tokenizer_from_spec(
        {"kind": "bpe", "path": str(trained_dir(root, bpe_files.GPT4_PATTERN))}).spec(),
                     "llama-bpe"),
    "trained-gpt2": (lambda root, mp: tokenizer_from_spec(
        {"kind": "bpe", "path": str(trained_dir(root, bpe_files.GPT2_PATTERN))}).spec(),
                     "gpt-2"),
    "hf-trained": (lambda root, mp: {"kind": "hf", "path": str(hf_dir(
        root, trained_dir(root, bpe_files.GPT4_PATTERN)))}, "llama-bpe"),
    "hf-gpt2": (lambda root, mp: {"kind": "hf", "path": str(gpt2_fast_dir(root))}, "gpt-2"),
    "hf-smollm": (lambda root, mp: {"kind": "hf", "path": str(smollm_dir(root))}, "smollm"),
}


@pytest.mark.parametrize("name", list(VOCABS))
def test_every_byte_level_vocabulary_tokenizes_in_llama_cpp_as_in_folio(tmp_path, monkeypatch,
                                                                        name):
    make_spec, pre = VOCABS[name]
    spec = make_spec(tmp_path, monkeypatch)
    out = export(ranks_run(tmp_path, spec), tmp_path / "m.gguf")
    llm = llama(out)
    assert llm.metadata["tokenizer.ggml.pre"] == pre
    tokenizer = tokenizer_from_spec(spec)
    for text in (SLICE, ODD_TEXT, NUMBERS):
        ids = tokenize(llm, text)
        assert ids == tokenizer.encode(text), text[:40]
        assert llm.detokenize(ids).decode("utf-8") == text
    modelfile = (tmp_path / "Modelfile").read_text()
    assert ("PARAMETER stop" in modelfile) == (tokenizer.eot_id is not None)
