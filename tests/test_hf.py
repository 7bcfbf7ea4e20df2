"""GPT-2 weights in from, and out to, Hugging Face transformers: logits must agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402  (in the test environment: requirements.txt)

from folio.cli import main  # noqa: E402
from folio.data.tokenizer import GPT2Tokenizer  # noqa: E402
from folio.errors import CheckpointError, ConfigError  # noqa: E402
from folio.model.gpt import GPT, GPTConfig  # noqa: E402
from folio.store import checkpoint, rundir, sources  # noqa: E402
from folio.store.hf_import import load_pretrained  # noqa: E402

TOL = 1e-4
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak. café 🙂"


def folio_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """All-position logits over the real vocabulary, (B, T, vocab_size)."""
    with torch.no_grad():
        logits = model.eval().lm_head(model.hidden(idx))  # (B, T, V_padded)
    return logits[..., :model.config.vocab_size]


def max_diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    diff = (a.float() - b.float()).abs().max().item()
    print(f"max abs logit diff ({what}): {diff:.3e}")
    return diff


@pytest.fixture
def hf_gpt2_dir(tmp_path) -> tuple[Path, object]:
    """A small random GPT-2 saved the way the hub stores one (config.json + safetensors)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                     vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path / "hf-gpt2"
    model.save_pretrained(path)
    return path, model


def make_run(run_dir: Path, config: GPTConfig, tokenizer: dict, seed: int = 0) -> GPT:
    """A folio run dir with random weights, written through rundir's own writers."""
    torch.manual_seed(seed)
    model = GPT(config)
    run_dir.mkdir(parents=True)
    checkpoint.save_model_weights(run_dir / rundir.MODEL_FILE, model, {"iter_num": 0})
    rundir.write_run_info(run_dir, rundir.RunInfo(model=config.to_dict(), tokenizer=tokenizer))
    return model


def test_hf_gpt2_dir_imports_with_matching_logits(hf_gpt2_dir):
    path, hf_model = hf_gpt2_dir
    model = load_pretrained(str(path), dropout=0.1)
    assert model.config == GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2,
                                      n_embd=32, dropout=0.1, bias=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.shape[0] == 50304
    assert not model.transformer.wte.weight[50257:].any()  # padding rows are zero
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(idx).logits
    assert max_diff(folio_logits(model, idx), expected, "HF dir -> folio") <= TOL


def test_imported_gpt2_keeps_training(hf_gpt2_dir):
    """A few optimizer steps on one batch lower the imported model's loss (every step)."""
    model = load_pretrained(str(hf_gpt2_dir[0]), dropout=0.0).train()
    assert all(p.device.type == "cpu" for p in model.parameters())
    idx = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(idx[:, :-1], targets=idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("losses:", losses)
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.1, losses


def test_unknown_model_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="gpt2-small"):
        load_pretrained("gpt2-small", dropout=0.0)
    (tmp_path / "not-hf").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(str(tmp_path / "not-hf"), dropout=0.0)


@pytest.mark.slow
def test_gpt2_without_cached_weights_offline_is_one_line_error(tmp_path):
    # A fresh process so HF_HOME (an empty cache) and HF_HUB_OFFLINE take effect at import.
    code = ("from folio.store.hf_import import load_pretrained\n"
            "from folio.errors import CheckpointError\n"
            "try:\n    load_pretrained('gpt2-medium', dropout=0.0)\n"
            "except CheckpointError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "'gpt2-medium'" in lines[0] and "huggingface-cli download gpt2-medium" in lines[0]


def test_export_gpt2_run_loads_in_transformers_with_tokenizer(tmp_path):
    run = tmp_path / "run"
    model = make_run(run, GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2,
                                    n_embd=32, bias=True), {"kind": "gpt2"})
    out = tmp_path / "hf-out"
    assert main(["export", str(run), "--format", "hf", str(out)]) == 0
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_logits = hf_model.eval()(idx).logits
    assert max_diff(folio_logits(model, idx), hf_logits, "folio gpt2 run -> HF") <= TOL

    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = GPT2Tokenizer()
    ids = hf_tok(TEXT)["input_ids"]
    assert ids == ours.encode(TEXT)
    assert hf_tok.decode(ids) == TEXT
    assert hf_tok.eos_token_id == ours.eot_id


def test_export_char_run_writes_its_tokenizer_and_vocabulary(tiny_run, tmp_path):
    out = tmp_path / "hf-char"
    assert main(["export", str(tiny_run), "--format=hf", str(out)]) == 0
    model, tokenizer, _ = sources.load_model(tiny_run)
    note = json.loads((out / "folio_vocab.json").read_text("utf-8"))
    assert note["tokenizer"] == tokenizer.spec()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok("ROMEO:\nWhat light")["input_ids"] == tokenizer.encode("ROMEO:\nWhat light")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert hf_model.config.vocab_size == tokenizer.vocab_size
    idx = torch.tensor([tokenizer.encode("ROMEO:\nWhat light through yonder")])  # <= block
    with torch.no_grad():
        hf_logits = hf_model.eval()(idx).logits
    assert max_diff(folio_logits(model, idx), hf_logits, "folio char run -> HF") <= TOL


def test_an_exported_char_run_samples_like_the_run(tiny_run, tmp_path, capsys):
    out = tmp_path / "hf-char"
    assert main(["export", str(tiny_run), "--format=hf", str(out)]) == 0
    model, tokenizer, _ = sources.load_model(tiny_run)
    back, back_tokenizer, info = sources.load_model(out)
    assert back_tokenizer.spec() == tokenizer.spec() and info.source == "hf"
    idx = torch.tensor([tokenizer.encode("ROMEO:\nWhat light")])
    assert max_diff(folio_logits(back, idx), folio_logits(model, idx), "char roundtrip") <= TOL
    sample = ["sample", "--max_new_tokens=20", "--num_samples=1", "--temperature=0",
              "--device=cpu"]
    capsys.readouterr()
    assert main([*sample, str(tiny_run)]) == 0
    from_run = capsys.readouterr().out
    assert main([*sample, str(out)]) == 0
    assert capsys.readouterr().out == from_run


def test_hf_roundtrip_export_then_import(tmp_path):
    run = tmp_path / "run"
    model = make_run(run, GPTConfig(block_size=16, vocab_size=50257, n_layer=2, n_head=2,
                                    n_embd=32, bias=False), {"kind": "gpt2"}, seed=3)
    main(["export", str(run), "--format", "hf", str(tmp_path / "out")])
    back = load_pretrained(str(tmp_path / "out"), dropout=0.0)
    idx = torch.randint(0, 50257, (1, 16))
    assert max_diff(folio_logits(back, idx), folio_logits(model, idx), "roundtrip") <= TOL


def test_export_refuses_a_non_empty_out_dir_unless_forced(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run, GPTConfig(block_size=8, vocab_size=50257, n_layer=1, n_head=1, n_embd=8),
             {"kind": "gpt2"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["export", str(run), "--format", "hf", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["export", str(run), "--format", "hf", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_of_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--format", "hf", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("folio: error:") and len(err.strip().splitlines()) == 1
    assert main(["export", str(tmp_path), "--format", "onnx", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
