"""Small models in from Hugging Face (`--init_from=DIR`, `folio sample --out_dir=DIR`): tiny
random Llama (SmolLM2's class), Qwen3, Apertus and Arcee models saved with a tokenizer compute
the same logits in folio, decode the same greedy text, finetune and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import SHAKESPEARE_TEXT

from folio.cli import main
from folio.errors import CheckpointError, ConfigError
from folio.infer.decode import CachedDecoder, RecomputeDecoder
from folio.model.gpt import GPT
from folio.speed import kernels
from folio.speed.packed import decoding_copy
from folio.store import gguf_export, hf_import, hf_rotary, sources
from folio.store.hf_tokenizer import char_tokenizer

TOL = 1e-4
TEXT = SHAKESPEARE_TEXT.read_text("utf-8")
CHARS = sorted(set(TEXT))
EOT = "<|endoftext|>"
VOCAB = len(CHARS) + 1  # the characters, then end-of-text
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None,
             eos_token_id=len(CHARS), pad_token_id=None)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
MODELS = {  # name: (config class, settings beyond SHAPE)
    "llama": ("LlamaConfig", {"intermediate_size": 96, "tie_word_embeddings": True}),  # SmolLM2
    "llama3-scaled": ("LlamaConfig", {"intermediate_size": 96, "tie_word_embeddings": False,
                                      "rope_parameters": LLAMA3}),
    "qwen3": ("Qwen3Config", {"intermediate_size": 96, "head_dim": 32,
                              "tie_word_embeddings": True}),
    "apertus": ("ApertusConfig", {"intermediate_size": 160, "tie_word_embeddings": False}),
    "arcee": ("ArceeConfig", {"intermediate_size": 128, "attention_bias": True,
                              "mlp_bias": True, "num_key_value_heads": 4}),
}


def save_tokenizer(directory: Path) -> None:
    """A character tokenizer over tiny Shakespeare, with an end-of-text token, as the
    tokenizer.json (and tokenizer_config.json) a hub model dir holds."""
    import tokenizers
    tok = char_tokenizer(tokenizers, CHARS)
    tok.add_special_tokens([EOT])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT).save_pretrained(
        directory)


def save_model(directory: Path, name: str, seed: int = 0, **changes) -> torch.nn.Module:
    """A random model of MODELS[name] with its weights (norms too) moved off their init, so
    that logits spread and every tensor matters; saved with the tokenizer."""
    config_class, settings = MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**SHAPE, **settings, **changes})
    model = getattr(transformers, hf_rotary.CLASSES[config.model_type][1])(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (dir, the transformers model saved there); built once per module."""
    made = {}

    def get(name: str):
        if name not in made:
            path = tmp_path_factory.mktemp("hf") / name
            made[name] = (path, save_model(path, name))
        return made[name]
    return get


def all_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model.hidden(idx))  # (B, T, V)


def max_diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    diff = (a.float() - b.float()).abs().max().item()
    print(f"max abs logit diff ({what}): {diff:.3e}")
    return diff


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
def test_imported_model_computes_the_same_logits(hf_dirs, name):
    path, hf_model = hf_dirs(name)
    model, tokenizer, info = sources.load_model(path)
    idx = tokens()
    with torch.no_grad():
        theirs = hf_model(idx).logits
    assert max_diff(all_logits(model, idx), theirs, f"{name} HF -> folio") <= TOL
    assert tokenizer.kind == "hf" and tokenizer.eot_id == len(CHARS)
    assert info.source == "hf" and model.config.norm_weight


@pytest.mark.parametrize("name", list(MODELS))
def test_imported_model_exports_back_to_its_class(hf_dirs, name):
    path, hf_model = hf_dirs(name)
    model = hf_import.load_pretrained(str(path)).eval()
    back = hf_rotary.to_hf_model(model)
    assert type(back) is type(hf_model)
    with pytest.raises(ConfigError, match="cannot export as GGUF: .*export --format hf"):
        gguf_export.architecture(model)  # not llama.cpp's shapes of folio's own models
    idx = tokens(2)
    with torch.no_grad():
        diff = max_diff(back(idx).logits, hf_model(idx).logits, f"{name} HF -> folio -> HF")
    assert diff <= TOL


@pytest.mark.parametrize("name", ["llama", "qwen3", "apertus"])
def test_cached_decoding_and_training_kernels_keep_the_logits(hf_dirs, name):
    """Grouped-query heads, another head width and learned norms through the speed layer:
    the KV cache (and the decoding copy) gives the no-cache logits; the CPU training kernels
    the plain model's loss."""
    model = hf_import.load_pretrained(str(hf_dirs(name)[0])).eval()
    window = tokens(3)[0, :40].tolist()
    cached, plain = CachedDecoder(model), RecomputeDecoder(model)
    for end in range(30, 40):
        diff = (cached(window[:end]) - plain(window[:end])).abs().max().item()
        assert diff <= TOL, (end, diff)
    packed = decoding_copy(model, pack=True)
    cache = packed.new_cache()
    with torch.no_grad():
        packed(torch.tensor([window[:39]]), cache=cache)
        step = packed(torch.tensor([window[39:40]]), cache=cache)
    assert (step[0] - plain(window)).abs().max().item() <= TOL
    idx, targets = tokens(4)[:, :-1], tokens(4)[:, 1:]
    with torch.no_grad():
        loss = model(idx, targets)
        fast = kernels.apply(hf_import.load_pretrained(str(hf_dirs(name)[0])).eval(),
                             kernels.Kernels.for_device("cpu"))(idx, targets)
    assert abs(loss.item() - fast.item()) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_folio_sample_greedy_text_equals_transformers_generate(hf_dirs, name, capsys):
    path, hf_model = hf_dirs(name)
    prompt = "ROMEO:\nBut soft"
    capsys.readouterr()
    assert main(["sample", f"--out_dir={path}", f"--start={prompt}", "--top_k=1",
                 "--num_samples=1", "--max_new_tokens=60", "--device=cpu",
                 "--dtype=float32"]) == 0
    ours = capsys.readouterr().out
    hf_tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = hf_model.generate(ids, max_new_tokens=60, do_sample=False,
                                attention_mask=torch.ones_like(ids))[0, ids.size(1):].tolist()
    if len(CHARS) in new:  # folio's text ends before end-of-text
        new = new[:new.index(len(CHARS))]
    theirs = hf_tok.decode(new)
    assert len(theirs) > 10
    assert ours.startswith(prompt + theirs), (ours, theirs)


def prepare_with(path: Path, data_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:60_000], encoding="utf-8")
    assert main(["prepare", str(text), "--name=imported", f"--data_dir={data_dir}",
                 f"--tokenizer=hf:{path}"]) == 0


def finetune(path: Path, data_dir: Path, out: Path, **settings) -> int:
    args = ["train", "--dataset=imported", f"--data_dir={data_dir}", f"--out_dir={out}",
            f"--init_from={path}", "--block_size=32", "--batch_size=8", "--device=cpu",
            "--compile=False", "--dtype=float32", "--eval_iters=2", "--log_interval=5",
            "--eval_interval=10", "--max_iters=20", "--lr_decay_iters=30",
            "--learning_rate=3e-3", "--warmup_iters=0", "--always_save_checkpoint=True"]
    return main(args + [f"--{k}={v}" for k, v in settings.items()])


def eval_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["val_loss"] for r in rows if r["kind"] == "eval"}


@pytest.mark.slow
def test_finetune_an_imported_model_then_resume(hf_dirs, tmp_path):
    path, _ = hf_dirs("llama")
    data_dir, out = tmp_path / "data", tmp_path / "run"
    prepare_with(path, data_dir, tmp_path)
    assert finetune(path, data_dir, out) == 0
    losses = eval_losses(out)
    assert losses[20] < losses[0] - 0.1, losses
    info = json.loads((out / "run.json").read_text())
    assert info["model"]["mlp"] == "swiglu" and info["model"]["n_kv_head"] == 2
    assert info["tokenizer"]["kind"] == "hf"
    assert finetune("resume", data_dir, out, max_iters=30) == 0
    losses = eval_losses(out)
    assert 30 in losses and losses[30] < losses[0]
    model, tokenizer, _ = sources.load_model(out)  # the finetuned run samples with its tokenizer
    assert model.config.block_size == 32 and tokenizer.kind == "hf"
    exported = tmp_path / "hf-out"  # and goes back out as the class it came in as
    assert main(["export", str(out), "--format=hf", str(exported)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    assert type(back).__name__ == "LlamaForCausalLM"
    idx = tokens(5)[:, :32]
    with torch.no_grad():
        assert max_diff(back.eval()(idx).logits, all_logits(model, idx), "finetuned") <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    assert hf_tok(TEXT[:3000])["input_ids"] == tokenizer.encode(TEXT[:3000])


def test_a_dataset_of_another_tokenizer_is_refused(hf_dirs, tmp_path, capsys, char_data_dir):
    path, _ = hf_dirs("llama")
    assert main(["train", "--dataset=shakespeare_char", f"--data_dir={char_data_dir}",
                 f"--out_dir={tmp_path / 'run'}", f"--init_from={path}", "--device=cpu",
                 "--max_iters=1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"--tokenizer=hf:{path}" in err, err


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("make, words", [
    (lambda d: transformers.MistralForCausalLM(transformers.MistralConfig(
        **{**SHAPE, "intermediate_size": 96, "sliding_window": 16})).save_pretrained(d),
     ["MistralForCausalLM", "LlamaForCausalLM, Qwen3ForCausalLM"]),
    (lambda d: save_model(d, "llama", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                       "rope_theta": 1e4}),
     ["LlamaForCausalLM", "rope_scaling 'yarn'"]),
    (lambda d: save_model(d, "qwen3", use_sliding_window=True, sliding_window=16,
                          max_window_layers=0),
     ["Qwen3ForCausalLM", "sliding-window"]),
    (lambda d: save_model(d, "llama", attention_bias=True),
     ["attention_bias=True with mlp_bias=False"]),
])
def test_unsupported_models_are_refused_in_one_line(tmp_path, capsys, make, words):
    make(tmp_path / "hf")
    with pytest.raises(CheckpointError):
        hf_import.load_pretrained(str(tmp_path / "hf"))
    assert main(["sample", f"--out_dir={tmp_path / 'hf'}", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("folio: error:") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_an_uncached_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(CheckpointError, match="huggingface-cli download HuggingFaceTB/Smol"):
        hf_import.load_pretrained("HuggingFaceTB/SmolLM2-135M")


def test_a_long_context_cache_grows_and_keeps_the_logits():
    """An imported model's 8k-40k context is not preallocated: the cache starts at
    KVCache.PREALLOCATED positions and grows, with the same logits as no cache."""
    from folio.model.gpt import GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=4096, vocab_size=32, n_layer=1, n_head=2, n_embd=16,
                          rope=True, norm="rmsnorm", n_kv_head=1, bias=False)).eval()
    idx = torch.randint(0, 32, (1, 2060))
    cache = model.new_cache()
    assert cache.keys.size(3) == cache.PREALLOCATED < cache.capacity == 4096
    with torch.no_grad():
        model(idx[:, :2040], cache=cache)
        steps = [model(idx[:, t:t + 1], cache=cache) for t in range(2040, 2060)]
        full = [model(idx[:, :t + 1]) for t in (2047, 2048, 2059)]
    assert cache.keys.size(3) == 4096 and cache.length == 2060
    for t, logits in zip((2047, 2048, 2059), full, strict=True):
        assert (steps[t - 2040] - logits).abs().max().item() <= TOL


def test_folio_serve_lists_and_loads_an_imported_dir(hf_dirs):
    from folio.infer.serve.runs import ModelPool, RunIndex, summarise
    path, _ = hf_dirs("qwen3")
    assert summarise("qwen3", path)["error"] is None
    loaded = ModelPool(RunIndex([str(path)]), capacity=1, device="cpu",
                       dtype="float32").get(path.name)
    assert loaded.tokenizer.kind == "hf" and loaded.model.config.qk_norm


@pytest.mark.parametrize("mlp, qk_norm, kind", [("swiglu", False, "llama"),
                                                ("swiglu", True, "qwen3"),
                                                ("xielu", True, "apertus")])
def test_folio_models_with_the_imported_mlps_export_to_their_class(mlp, qk_norm, kind):
    """A run trained with --mlp=swiglu or xielu (weightless norms, folio's epsilon)."""
    from folio.model.gpt import GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32,
                          bias=False, rope=True, norm="rmsnorm", qk_norm=qk_norm, mlp=mlp,
                          tie_head=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    back = hf_rotary.to_hf_model(model)
    assert back.config.model_type == kind
    idx = tokens(6)
    with torch.no_grad():
        assert max_diff(back(idx).logits, all_logits(model, idx), f"folio {mlp}") <= TOL
