"""`folio export --format gguf`: one file for llama.cpp and Ollama. transformers' GGUF reader
gives folio's logits for the nanoGPT recipe (llama.cpp's gpt2 architecture); the modern
recipe's file (llama.cpp's apertus) is read back tensor by tensor, as transformers has no
apertus GGUF reader; what cannot be written exactly is refused in one line. llama.cpp itself
runs the files in test_gguf_llama_cpp.py."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import tiktoken
import torch
import transformers
from test_export import (
    RECIPES,
    SHAKESPEARE,
    TOKENIZERS,
    folio_logits,
    make_run,
    vocab_size,
)

from folio.cli import main
from folio.data.tokenizer import GPT2Tokenizer, gpt2_encoding
from folio.model.gpt import GPTConfig
from folio.store import gguf_export, gguf_vocab, hf_rotary
from folio.store.hf_tokenizer import write_gpt2_tokenizer

TOL = 1e-4


def run_of(root: Path, recipe: str, kind: str, tie: bool = True, **changes):
    config = GPTConfig(block_size=256, vocab_size=vocab_size(kind), n_layer=2, n_head=2,
                       n_embd=32, tie_head=tie, **{**RECIPES[recipe], **changes})
    return make_run(root / "run", config, TOKENIZERS[kind])


def export(root: Path, *args: str) -> int:
    return main(["export", str(root / "run"), "--format=gguf", *args])


@pytest.mark.slow  # transformers' GGUF reader dequantises and builds the model: seconds each
@pytest.mark.parametrize("kind", ["char", "gpt2"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_transformers_reads_a_nanogpt_gguf_with_folio_logits(tmp_path, kind, tie):
    """llama-cpp-python 0.3.36, by hand, reads these files too: the same 100 greedy tokens at
    f32 and f16, logits within 3e-3 (llama.cpp's GELU is the tanh approximation)."""
    model = run_of(tmp_path, "nanogpt", kind, tie)
    assert export(tmp_path, str(tmp_path / "out" / "model.gguf")) == 0
    # transformers' GGUF reader maps context_length to n_ctx, not n_positions, and gives
    # GPT-2 its tanh GELU: both are told (llama.cpp has a tanh GELU too; docs/export.md)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", gguf_file="model.gguf", n_positions=256,
        activation_function="gelu").eval()
    assert hf_model.config.tie_word_embeddings == tie
    idx = torch.randint(0, vocab_size(kind), (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf_model(idx).logits - folio_logits(model, idx)).abs().max().item()
    print(f"max abs logit diff (nanogpt gguf f32, {'tied' if tie else 'untied'}, {kind}): "
          f"{diff:.3e}")
    assert diff <= TOL
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n") and "num_ctx 256" in modelfile
    assert ('PARAMETER stop "<|endoftext|>"' in modelfile) == (kind == "gpt2")


@pytest.mark.slow  # transformers' GGUF tokenizer reader over all of tiny Shakespeare
def test_the_gguf_gpt2_vocabulary_encodes_tiny_shakespeare_to_folio_ids(tmp_path):
    run_of(tmp_path, "nanogpt", "gpt2")
    assert export(tmp_path, str(tmp_path / "m.gguf")) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ids = theirs(SHAKESPEARE)["input_ids"]
    assert ids == GPT2Tokenizer().encode(SHAKESPEARE)
    assert theirs.decode(ids) == SHAKESPEARE


def fields(path: Path) -> dict:
    """A GGUF file's metadata, strings and arrays decoded."""
    reader, out = gguf.GGUFReader(path), {}
    for name, field in reader.fields.items():
        values = [field.parts[i] for i in field.data]
        if field.types and field.types[-1] == gguf.GGUFValueType.STRING:
            values = [bytes(v).decode() for v in values]
        else:
            values = [v.tolist()[0] if len(v) == 1 else v.tolist() for v in values]
        array = field.types and field.types[0] == gguf.GGUFValueType.ARRAY
        out[name] = values if array else values[0] if values else None
    return out


def test_a_character_vocabulary_is_a_sentencepiece_one_without_space_prefix(tmp_path):
    """What llama.cpp reads (checked by hand with llama-cpp-python 0.3.36: tiny Shakespeare and
    these characters tokenize to folio's ids and back). transformers' GGUF reader prepends a
    space to a sentencepiece vocabulary whatever the file says, so it is not the check here."""
    chars = ["\n", " ", "a", "é", "€", "🙂"]
    config = GPTConfig(block_size=16, vocab_size=len(chars), n_layer=1, n_head=2, n_embd=32)
    make_run(tmp_path / "run", config, {"kind": "char", "chars": chars})
    assert export(tmp_path, str(tmp_path / "m.gguf")) == 0
    meta = fields(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == ["\n", "\u2581", "a", "é", "€", "🙂"]
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "tokenizer.ggml.eos_token_id" not in meta


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_modern_recipe_is_llama_cpps_apertus_with_relu2(tmp_path, tie):
    """The tensors transformers' Apertus computes folio's logits with (test_export.py), under
    llama.cpp's names. llama-cpp-python 0.3.36, by hand, with an f32 KV cache: logits within
    6e-6 of folio's and the same 100 greedy tokens (docs/export.md)."""
    model = run_of(tmp_path, "modern", "char", tie=tie)
    assert export(tmp_path, str(tmp_path / "m.gguf")) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "apertus"
    tensors = {t.name: torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())
               for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.APERTUS, 2)
    expected = {names.get_name(k, try_suffixes=(".weight",)): v
                for k, v in hf_rotary.to_hf_state_dict(model).items()}
    # llama.cpp's apertus needs output.weight: a tied head is written as the embedding's copy
    expected.setdefault("output.weight", expected["token_embd.weight"])
    assert set(tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name].reshape(tensor.shape), tensor), name
    # xIELU with the file's parameters is ReLU² (transformers' own xIELU, which applies the
    # same softplus to alpha_p and alpha_n as llama.cpp's ggml_xielu)
    params = {k: reader.fields[f"xielu.{k}"] for k in ("alpha_p", "alpha_n", "beta", "eps")}
    values = {k: float(f.parts[f.data[0]][0]) for k, f in params.items()}
    xielu = transformers.activations.XIELUActivation(dtype=torch.float32)
    with torch.no_grad():
        xielu.alpha_p.fill_(values["alpha_p"])
        xielu.alpha_n.fill_(values["alpha_n"])
        xielu.beta.fill_(values["beta"])
        xielu.eps.fill_(values["eps"])
    x = torch.randn(4096) * 3
    assert (xielu(x) - torch.relu(x).square()).abs().max() <= 1e-6 * x.square().max()


@pytest.mark.parametrize("dtype, matrix_type", [("f16", "F16"), ("bf16", "BF16"),
                                                ("q8_0", "Q8_0")])
def test_dtypes_store_matrices_so_and_vectors_in_float32(tmp_path, dtype, matrix_type):
    run_of(tmp_path, "nanogpt", "char")
    assert export(tmp_path, str(tmp_path / "m.gguf"), f"--dtype={dtype}") == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == matrix_type
    assert types["blk.0.attn_norm.weight"] == types["blk.0.attn_qkv.bias"] == "F32"


@pytest.mark.parametrize("args, words", [
    (["--format=gguf", "OUT/model.bin"], ["ending in .gguf"]),
    (["--format=hf", "OUT/hf", "--dtype=q8_0"], ["--dtype=q8_0", "GGUF quantisation"]),
    (["--format=gguf", "OUT/m.gguf", "--dtype=q4_0"], ["q4_0"]),
    (["--format=safetensors", "OUT/x"], ["format"]),
])
def test_bad_export_settings_are_one_line_writing_nothing(tmp_path, capsys, args, words):
    run_of(tmp_path, "nanogpt", "char")
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    assert main(["export", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("folio: error:") and len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def cl100k(monkeypatch) -> None:
    """tiktoken:cl100k_base offline: GPT-2's ranks under cl100k's split pattern."""
    enc = tiktoken.Encoding("cl100k_base", pat_str=gguf_vocab.CL100K_PATTERN,
                            mergeable_ranks=gpt2_encoding()._mergeable_ranks,
                            special_tokens={"<|endoftext|>": 50256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)


@pytest.fixture(scope="module")
def gpt2_tokenizer_json(tmp_path_factory) -> str:
    """GPT-2's tokenizer.json as transformers saves it."""
    root = tmp_path_factory.mktemp("gpt2-tokenizer")
    write_gpt2_tokenizer(root, 64)
    return (root / "tokenizer.json").read_text()


def hf_tokenizer_dir(root: Path, source: str, change) -> dict:
    """An hf:PATH tokenizer: `source` (a tokenizer.json) changed."""
    data = json.loads(source)
    change(data)
    (root / "tokenizer.json").write_text(json.dumps(data))
    return {"kind": "hf", "path": str(root)}


def split(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}


def smollm(digits: dict | None = None, byte_level: dict | None = None, last: bool = False
           ) -> dict:
    """SmolLM2's pre-tokenizer (Digits each alone, then GPT-2's ByteLevel), changed."""
    steps = [{"type": "Digits", "individual_digits": True, **(digits or {})},
             {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True, **(byte_level or {})}]
    return {"type": "Sequence", "pretokenizers": steps[::-1] if last else steps}


SHAPE = "GPT-2's ByteLevel or one regex Split"
HF_CHANGES = {
    "normalizer": (lambda d: d.update(normalizer={"type": "NFC"}), ["no normalizer"]),
    "pattern": (lambda d: d.update(pre_tokenizer=split(r"\p{L}+|\s+|.")),
                ["none it knows is exactly", "needs a llama.cpp pre-tokenizer"]),
    "ignore_merges": (lambda d: d["model"].update(ignore_merges=True),
                      ["looks whole pieces up", "gpt-2"]),
    "prefix_space": (lambda d: d["pre_tokenizer"].update(add_prefix_space=True),
                     [SHAPE]),
    "byte_fallback": (lambda d: d["model"].update(byte_fallback=True), ["no byte fallback"]),
    "digits_grouped": (lambda d: d.update(pre_tokenizer=smollm({"individual_digits": False})),
                       [SHAPE, "Digits(individual_digits)"]),
    "digits_last": (lambda d: d.update(pre_tokenizer=smollm(last=True)), [SHAPE]),
    "digits_no_regex": (lambda d: d.update(pre_tokenizer=smollm(byte_level={"use_regex": False})),
                        [SHAPE]),
    "digits_prefix": (lambda d: d.update(pre_tokenizer=smollm(
        byte_level={"add_prefix_space": True})), [SHAPE]),
}


def test_smollm2s_digits_then_byte_level_is_llama_cpps_smollm(tmp_path, gpt2_tokenizer_json):
    # llama.cpp's smollm: \p{N} isolated, then GPT-2's regex (test_gguf_llama_cpp.py runs it)
    hf_tokenizer_dir(tmp_path, gpt2_tokenizer_json, lambda d: d.update(pre_tokenizer=smollm()))
    assert gguf_vocab.hf_vocab(tmp_path / "tokenizer.json").pre == "smollm"


@pytest.mark.parametrize("recipe, changes, tokenizer, words", [
    ("modern", {"qk_norm": False, "bias": True}, None, ["bias=True", "arcee"]),
    ("modern", {"mlp": "gelu"}, None, ["mlp='gelu'", "ReLU²"]),
    ("nanogpt", {}, "cl100k", ["cl100k", "llama-bpe", "\\s++$"]),
    *[("nanogpt", {}, name, words) for name, (_, words) in HF_CHANGES.items()],
])
def test_what_gguf_cannot_hold_is_refused_in_one_line(tmp_path, capsys, monkeypatch, recipe,
                                                      changes, tokenizer, words,
                                                      gpt2_tokenizer_json):
    if tokenizer == "cl100k":  # a tiktoken run, without downloading its encoding
        cl100k(monkeypatch)
        spec = {"kind": "tiktoken", "name": "cl100k_base"}
    elif tokenizer:
        (tmp_path / "tok").mkdir()
        spec = hf_tokenizer_dir(tmp_path / "tok", gpt2_tokenizer_json,
                                HF_CHANGES[tokenizer][0])
    if tokenizer:
        config = GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=32,
                           **RECIPES[recipe])
        make_run(tmp_path / "run", config, spec)
    else:
        run_of(tmp_path, recipe, "char", **changes)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert export(tmp_path, str(tmp_path / "out" / "m.gguf")) == 2
    err = capsys.readouterr().err
    assert err.startswith("folio: error:") and len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_character_vocabulary_holding_the_sentencepiece_space_is_refused(tmp_path, capsys):
    chars = ["a", "\u2581"]
    config = GPTConfig(block_size=16, vocab_size=len(chars), n_layer=1, n_head=2, n_embd=32)
    make_run(tmp_path / "run", config, {"kind": "char", "chars": chars})
    assert export(tmp_path, str(tmp_path / "m.gguf")) == 2
    assert "U+2581" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_existing_file_is_kept_unless_forced(tmp_path, capsys):
    run_of(tmp_path, "nanogpt", "char")
    (tmp_path / "Modelfile").write_text("mine")
    assert export(tmp_path, str(tmp_path / "m.gguf")) == 2
    assert "Modelfile exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "Modelfile").read_text() == "mine" and not (tmp_path / "m.gguf").exists()
    assert export(tmp_path, str(tmp_path / "m.gguf"), "--force") == 0
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf", "run"]


def test_architecture_names_the_refused_setting():
    model = type("M", (), {"config": GPTConfig(n_layer=1, n_embd=16, n_head=2,
                                               **RECIPES["modern"], logit_softcap=15.0)})()
    with pytest.raises(Exception, match="logit_softcap=15"):
        gguf_export.architecture(model)


def test_a_modern_run_without_qk_norm_is_llama_cpps_arcee_with_adjacent_rotary_pairs(tmp_path):
    """llama.cpp's arcee turns adjacent rows (its "norm" rotation): each head's query rows are
    the Hugging Face halves interleaved (x_0, x_hs/2, x_1, ...); llama.cpp itself checks the
    logits' consequence (test_gguf_llama_cpp.py)."""
    model = run_of(tmp_path, "modern", "char", tie=True, qk_norm=False)
    assert export(tmp_path, str(tmp_path / "m.gguf")) == 0
    meta = fields(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "arcee" and not any("xielu" in k for k in meta)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())
               for t in reader.tensors}
    q = hf_rotary.to_hf_state_dict(model)["model.layers.0.self_attn.q_proj.weight"]
    hs = 16
    order = [h * hs + i // 2 + (i % 2) * hs // 2 for h in range(2) for i in range(hs)]
    assert torch.equal(tensors["blk.0.attn_q.weight"].reshape(q.shape), q[order])
    assert "output.weight" in tensors
