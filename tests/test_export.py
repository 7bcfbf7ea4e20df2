"""`folio export --format hf` for every recipe: standard transformers classes (no remote code)
whose logits equal folio's, and tokenizer files that AutoTokenizer loads and that encode tiny
Shakespeare to folio's ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import SHAKESPEARE_TEXT

from folio.cli import main
from folio.data.tokenizer import CharTokenizer, GPT2Tokenizer, TiktokenBPE, gpt2_encoding
from folio.errors import ConfigError
from folio.infer.sample import generate
from folio.model.gpt import GPT, GPTConfig
from folio.store import checkpoint, hf_rotary, rundir
from folio.store.hf_tokenizer import write_tokenizer

TOL = 1e-4
SHAKESPEARE = SHAKESPEARE_TEXT.read_text("utf-8")
CHARS = sorted(set(SHAKESPEARE))
RECIPES = {  # the model settings of each recipe (train/recipes.py), at a tiny size
    "nanogpt": {"bias": True},
    "modern": {"rope": True, "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2",
               "bias": False, "zero_init_proj": True},
}
TOKENIZERS = {"char": {"kind": "char", "chars": CHARS}, "gpt2": {"kind": "gpt2"}}
HF_CLASS = {"nanogpt": "GPT2LMHeadModel", "modern": "ApertusForCausalLM"}


def make_run(run_dir: Path, config: GPTConfig, tokenizer: dict, seed: int = 0,
             iter_num: int = 0) -> GPT:
    """A run dir holding random weights large enough that logits spread (not GPT-2's 0.02
    init, whose near-uniform logits would make any comparison easy to pass)."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    run_dir.mkdir(parents=True)
    checkpoint.save_model_weights(run_dir / rundir.MODEL_FILE, model, {"iter_num": 0})
    rundir.write_run_info(run_dir, rundir.RunInfo(model=config.to_dict(), tokenizer=tokenizer,
                                                  iter_num=iter_num))
    return model


def folio_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """All-position logits over the real vocabulary, soft-capped, (B, T, vocab_size)."""
    with torch.no_grad():
        return model.logits(model.hidden(idx))


def vocab_size(kind: str) -> int:
    return len(CHARS) if kind == "char" else 50257


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(folio model, export dir) per (recipe, tied head, tokenizer), exported once."""
    made: dict[tuple, tuple[GPT, Path]] = {}

    def get(recipe: str, tie: bool, kind: str, **changes) -> tuple[GPT, Path]:
        key = (recipe, tie, kind, tuple(sorted(changes.items())))
        if key not in made:
            root = tmp_path_factory.mktemp(f"{recipe}-{kind}")
            config = GPTConfig(block_size=256, vocab_size=vocab_size(kind), n_layer=2, n_head=2,
                               n_embd=32, tie_head=tie, **{**RECIPES[recipe], **changes})
            model = make_run(root / "run", config, TOKENIZERS[kind], seed=len(made))
            assert main(["export", str(root / "run"), "--format=hf", str(root / "hf")]) == 0
            made[key] = model, root / "hf"
        return made[key]
    return get


def hf_model_of(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


@pytest.mark.parametrize("kind", ["char", "gpt2"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("recipe", ["nanogpt", "modern"])
def test_transformers_logits_equal_folio_logits(exported, recipe, tie, kind):
    model, out = exported(recipe, tie, kind)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [HF_CLASS[recipe]] and "auto_map" not in config
    if recipe == "modern":  # F.rms_norm's default eps in float32, not a round 1e-6
        assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps
        # what transformers 4.x reads (checked by hand with 4.57.1): without it, Apertus's
        # default llama3-scaled rotation
        assert config["rope_theta"] == 10000 and config["rope_scaling"]["rope_type"] == "default"
    hf_model = hf_model_of(out)
    assert hf_model.config.vocab_size == vocab_size(kind)  # padding rows cropped
    assert hf_model.config.tie_word_embeddings == tie
    idx = torch.randint(0, vocab_size(kind), (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf_model(idx).logits
    ours = folio_logits(model, idx)
    assert ours.std() > 1.0  # spread logits: a wrong mapping cannot hide under the tolerance
    diff = (theirs - ours).abs().max().item()
    print(f"max abs logit diff ({recipe}, {'tied' if tie else 'untied'}, {kind}): {diff:.3e}")
    assert diff <= TOL


@pytest.mark.parametrize("changes, hf_class", [
    ({"qk_norm": False, "bias": True}, "ArceeForCausalLM"),
    ({"mlp": "gelu"}, "ApertusForCausalLM"),
])
def test_modern_variants_map_to_their_class(exported, changes, hf_class):
    model, out = exported("modern", False, "char", **changes)
    hf_model = hf_model_of(out)
    assert type(hf_model).__name__ == hf_class
    idx = torch.randint(0, len(CHARS), (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (hf_model(idx).logits - folio_logits(model, idx)).abs().max().item()
    print(f"max abs logit diff (modern {changes}): {diff:.3e}")
    assert diff <= TOL


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_autotokenizer_encodes_tiny_shakespeare_to_folio_ids(exported, kind):
    _, out = exported("nanogpt", True, kind)
    ours = CharTokenizer(CHARS) if kind == "char" else GPT2Tokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = theirs(SHAKESPEARE)["input_ids"]
    assert ids == ours.encode(SHAKESPEARE)
    assert theirs.decode(ids).encode("utf-8") == SHAKESPEARE.encode("utf-8")
    assert theirs.eos_token_id == ours.eot_id


@pytest.mark.parametrize("kind", ["char", "gpt2"])
@pytest.mark.parametrize("recipe", ["nanogpt", "modern"])
def test_greedy_generation_in_transformers_equals_folio(exported, recipe, kind):
    model, out = exported(recipe, recipe == "nanogpt", kind)
    tokenizer = CharTokenizer(CHARS) if kind == "char" else GPT2Tokenizer()
    prompt = "ROMEO:\nBut soft"
    ours = "".join(generate(model, tokenizer, prompt, 200, temperature=0.0))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = hf_model_of(out).generate(ids, max_new_tokens=200, do_sample=False,
                                        attention_mask=torch.ones_like(ids))[0, ids.size(1):]
    new = new.tolist()
    if tokenizer.eot_id in new:  # folio's text ends before end-of-text
        new = new[:new.index(tokenizer.eot_id)]
    assert len(ours) > 20
    assert hf_tok.decode(new) == ours


def test_tiktoken_encodings_convert_to_the_same_ids():
    """A tiktoken:NAME tokenizer (here GPT-2's ranks, offline) through the generic converter:
    the same ids as tiktoken on tiny Shakespeare and on odd text, decoded back exactly."""
    class Tiktoken(TiktokenBPE):
        kind, vocab_size, eot_id = "tiktoken", 50257, 50256
        _enc = gpt2_encoding()

    ours = Tiktoken()
    out = Path(__import__("tempfile").mkdtemp())
    write_tokenizer(out, ours, 64)
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in (SHAKESPEARE, "café 🙂\u00a0x\r\n\t  \n\n 12345 'll 'S  ...\u200b\u0301e ﬁ"):
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text)
        assert theirs.decode(ids) == text
    assert theirs.eos_token_id == 50256


def test_a_local_hf_tokenizer_goes_with_the_export_without_added_tokens(exported, tmp_path):
    """An hf:PATH tokenizer (one with a BOS post-processor) is exported so that AutoTokenizer
    adds nothing folio does not."""
    from folio.data.tokenizer import HFTokenizer

    _, gpt2_out = exported("nanogpt", True, "gpt2")
    source = tmp_path / "tok"
    tok = transformers.AutoTokenizer.from_pretrained(gpt2_out, local_files_only=True)
    tok.save_pretrained(source)
    raw = json.loads((source / "tokenizer.json").read_text())
    raw["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                             "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>",
                                                                  "ids": [50256],
                                                                  "tokens": ["<|endoftext|>"]}}}
    (source / "tokenizer.json").write_text(json.dumps(raw))
    ours = HFTokenizer(str(source))
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(out, ours, 64)
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = SHAKESPEARE[:5000]
    assert theirs(text)["input_ids"] == ours.encode(text) == GPT2Tokenizer().encode(text)


@pytest.mark.parametrize("changes, words", [
    ({"logit_softcap": 15.0}, ["logit_softcap=15", "soft-cap"]),
    ({"qk_norm": True, "bias": True}, ["bias=True with qk_norm=True"]),
    ({"rope": False}, ["rope=False"]),
])
def test_unmappable_models_are_refused_in_one_line_writing_nothing(tmp_path, capsys, changes,
                                                                  words):
    config = GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=16,
                       **{**RECIPES["modern"], **changes})
    make_run(tmp_path / "run", config, TOKENIZERS["char"])
    with pytest.raises(ConfigError):
        hf_rotary.model_type(config)
    assert main(["export", str(tmp_path / "run"), "--format=hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("folio: error:") and len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_without_weights_is_refused_in_one_line(tmp_path, capsys):
    config = GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=16)
    make_run(tmp_path / "run", config, TOKENIZERS["char"])
    (tmp_path / "run" / rundir.MODEL_FILE).unlink()
    assert main(["export", str(tmp_path / "run"), "--format=hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("folio: error:") and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_untied_gpt2_export_imports_back_untied(exported):
    from folio.store.hf_import import load_pretrained

    model, out = exported("nanogpt", False, "gpt2")
    back = load_pretrained(str(out), dropout=0.0)
    assert not back.config.tie_head
    assert back.lm_head.weight.data_ptr() != back.transformer.wte.weight.data_ptr()
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(3))
    assert (folio_logits(back, idx) - folio_logits(model, idx)).abs().max() <= TOL


def test_half_precision_exports_hold_their_dtype(tmp_path):
    from safetensors import safe_open

    config = GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=16,
                       **RECIPES["modern"])
    make_run(tmp_path / "run", config, TOKENIZERS["char"])
    out = tmp_path / "bf16"
    assert main(["export", str(tmp_path / "run"), "--format=hf", "--dtype=bf16", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
