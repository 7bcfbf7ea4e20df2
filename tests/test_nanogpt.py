"""nanoGPT out dirs (ckpt.pt + meta.pkl): loaded without running pickled code, converted."""

from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
from conftest import SHAKESPEARE_TEXT, tiny_args

from folio.cli import main
from folio.errors import CheckpointError
from folio.model.gpt import GPT, GPTConfig
from folio.store import checkpoint, rundir, sources
from folio.store.nanogpt import (
    read_meta_pkl,
    read_nanogpt_out_dir,
    resume_state_from_nanogpt,
)
from folio.store.rundir import is_nanogpt_dir

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False)


def shakespeare_chars() -> list[str]:
    return sorted(set(SHAKESPEARE_TEXT.read_text("utf-8")))


def nanogpt_optimizer_state(state: dict[str, torch.Tensor]) -> dict:
    """AdamW state after one step, grouped as nanoGPT's configure_optimizers groups it."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in state.items() if k != "lm_head.weight"}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-3,
                            betas=(0.9, 0.99))
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


def write_nanogpt_out_dir(out_dir: Path, vocab_size: int, seed: int = 0,
                          dataset: str = "shakespeare_char") -> GPT:
    """A ckpt.pt laid out exactly as nanoGPT's train.py saves it (compiled model).

    Returns the folio model whose first vocab_size embedding rows the checkpoint holds.
    """
    torch.manual_seed(seed)
    source = GPT(GPTConfig(vocab_size=vocab_size, **SHAPE))
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    wte = state["transformer.wte.weight"][:vocab_size].clone()  # nanoGPT pads nothing
    state["transformer.wte.weight"] = state["lm_head.weight"] = wte  # tied: one tensor
    model_args = dict(**SHAPE, vocab_size=vocab_size, dropout=0.0)
    config = dict(out_dir=str(out_dir), eval_interval=250, log_interval=10, eval_iters=200,
                  eval_only=False, always_save_checkpoint=False, init_from="scratch",
                  wandb_log=False, wandb_project="shakespeare-char", wandb_run_name="mini-gpt",
                  dataset=dataset, gradient_accumulation_steps=1, batch_size=64,
                  learning_rate=1e-3, max_iters=5000, weight_decay=0.1, beta1=0.9,
                  beta2=0.99, grad_clip=1.0, decay_lr=True, warmup_iters=100,
                  lr_decay_iters=5000, min_lr=1e-4, backend="nccl", device="cuda",
                  dtype="bfloat16", compile=True, **model_args)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()},
                "optimizer": nanogpt_optimizer_state(state), "model_args": model_args,
                "iter_num": 250, "best_val_loss": torch.tensor(1.4697), "config": config},
               out_dir / "ckpt.pt")
    return source.eval()


def write_meta_pkl(path: Path, chars: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)}}
    path.write_bytes(pickle.dumps(meta))


def logits(model: GPT, idx: torch.Tensor, vocab_size: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval().lm_head(model.hidden(idx))  # every position's logits
    return out[..., :vocab_size]


@pytest.fixture
def char_out_dir(tmp_path) -> tuple[Path, GPT, list[str]]:
    """nanoGPT's layout: out-shakespeare-char/ckpt.pt beside data/shakespeare_char/meta.pkl."""
    chars = shakespeare_chars()
    out = tmp_path / "out-shakespeare-char"
    source = write_nanogpt_out_dir(out, len(chars))
    write_meta_pkl(tmp_path / "data" / "shakespeare_char" / "meta.pkl", chars)
    return out, source, chars


class RunsShell:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class OpensFile(RunsShell):
    """A pickle payload that would create a file through builtins.open when unpickled."""

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_nanogpt_char_checkpoint_loads_with_matching_logits(char_out_dir):
    out, source, chars = char_out_dir
    assert is_nanogpt_dir(out)
    model, tokenizer, info, optimizer = read_nanogpt_out_dir(out)
    assert tokenizer.kind == "char" and tokenizer.vocab_size == len(chars) == 65
    assert model.config == GPTConfig(vocab_size=65, dropout=0.0, **SHAPE)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.transformer.wte.weight[65:].any()  # zero padding up to 128 rows
    assert info.iter_num == 250 and info.best_val_loss == pytest.approx(1.4697)
    assert info.tokenizer == {"kind": "char", "chars": chars}
    idx = torch.tensor([tokenizer.encode("ROMEO:\nBut soft, what light")])
    diff = (logits(model, idx, 65) - logits(source, idx, 65)).abs().max().item()
    print(f"max abs logit diff (nanoGPT ckpt.pt -> folio): {diff:.3e}")
    assert diff <= 1e-4
    wte_moments = optimizer["state"][optimizer["param_groups"][0]["params"][0]]
    assert wte_moments["exp_avg"].shape == (128, 32)  # padded like the embedding


def test_meta_pkl_is_found_by_dataset_or_given_explicitly(char_out_dir, tmp_path):
    out, _, chars = char_out_dir
    meta = tmp_path / "data" / "shakespeare_char" / "meta.pkl"
    moved = tmp_path / "elsewhere" / "meta.pkl"
    moved.parent.mkdir()
    meta.rename(moved)
    with pytest.raises(CheckpointError, match="--meta"):  # 65-row model, gpt2 fallback
        read_nanogpt_out_dir(out)
    _, tokenizer, info, _ = read_nanogpt_out_dir(out, meta=moved)
    assert tokenizer.spec()["chars"] == chars and info.imported_from["meta"] == str(moved)


def test_gpt2_checkpoint_with_padded_vocab_uses_the_real_vocab(tmp_path):
    source = write_nanogpt_out_dir(tmp_path / "out", 50304, dataset="openwebtext")
    model, tokenizer, _, _ = read_nanogpt_out_dir(tmp_path / "out")
    assert tokenizer.kind == "gpt2"
    assert model.config.vocab_size == 50257 and model.config.padded_vocab_size == 50304
    idx = torch.randint(0, 50257, (1, 16))
    assert torch.equal(logits(model, idx, 50257), logits(source, idx, 50257))


def test_import_nanogpt_writes_a_folio_run_dir(char_out_dir, tmp_path):
    out, source, _ = char_out_dir
    run = tmp_path / "folio-run"
    assert main(["import-nanogpt", str(out), str(run)]) == 0
    info = rundir.read_run_info(run)
    assert info.iter_num == 250 and info.tokenizer["kind"] == "char"
    assert info.config["n_layer"] == 2 and info.config["dataset"] == "shakespeare_char"
    assert {"model.safetensors", "resume.safetensors"} <= set(info.files)
    model, tokenizer, _ = sources.load_model(run)
    assert info.n_params == model.num_params()
    idx = torch.tensor([tokenizer.encode("KING:")])
    assert torch.equal(logits(model, idx, 65), logits(source, idx, 65))
    resume = checkpoint.load_resume(run)
    assert resume.iter_num == 250 and len(resume.optimizer["state"]) == len(
        list(model.parameters()))
    assert main(["import-nanogpt", str(out), str(run)]) == 2  # never overwrites a run


def test_malicious_ckpt_pt_is_refused_by_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": {}, "model_args": {}, "config": {"x": RunsShell(marker)}},
               out / "ckpt.pt")
    with pytest.raises(CheckpointError, match="refusing"):
        read_nanogpt_out_dir(out)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [RunsShell, OpensFile])
def test_meta_pkl_with_code_is_refused_and_never_runs(char_out_dir, tmp_path, payload):
    out, _, _ = char_out_dir
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"vocab_size": 65, "itos": {0: "a"}, "x": payload(marker)})
    if payload is OpensFile:  # the payload is live: plain pickle would create the file
        pickle.loads(evil).get("x").close()
        assert marker.exists()
        marker.unlink()
    (out / "meta.pkl").write_bytes(evil)
    with pytest.raises(CheckpointError, match="refusing"):
        read_nanogpt_out_dir(out)
    assert not marker.exists()


def test_meta_pkl_with_non_plain_data_is_refused(tmp_path):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "s": {1, 2}}))
    with pytest.raises(CheckpointError, match="refusing"):
        read_meta_pkl(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="refusing"):
        read_meta_pkl(path)


def test_import_and_training_write_run_json_with_the_same_keys(char_out_dir, tiny_run,
                                                                tmp_path):
    out, _, _ = char_out_dir
    assert main(["import-nanogpt", str(out), str(tmp_path / "run")]) == 0
    imported = json.loads((tmp_path / "run" / rundir.RUN_INFO).read_text())
    trained = json.loads((tiny_run / rundir.RUN_INFO).read_text())
    assert list(imported) == list(trained)
    assert imported["format_version"] == trained["format_version"] == rundir.RUN_FORMAT_VERSION
    assert (imported["source"], trained["source"]) == ("nanogpt", "train")
    assert set(imported["config"]) == set(trained["config"])  # both a full TrainConfig


def test_resume_state_from_a_nanogpt_dir(char_out_dir):
    out, _, _ = char_out_dir
    state, info = resume_state_from_nanogpt(out)
    assert state.iter_num == 250 and info.model["vocab_size"] == 65
    assert state.model["transformer.wte.weight"].shape == (128, 32)


@pytest.mark.slow
def test_train_resumes_from_a_nanogpt_out_dir(char_data_dir, tmp_path):
    chars = shakespeare_chars()
    out = tmp_path / "out-shakespeare-char"
    write_nanogpt_out_dir(out, len(chars))
    write_meta_pkl(out / "meta.pkl", chars)
    args = tiny_args(char_data_dir, out, init_from="resume", max_iters=255, eval_interval=5,
                     lr_decay_iters=300)
    assert main(["train", *args]) == 0
    info = rundir.read_run_info(out)
    assert info.iter_num == 255
    assert checkpoint.load_resume(out).iter_num == 255


def test_sample_from_a_nanogpt_out_dir(char_out_dir, capsys):
    out, _, chars = char_out_dir
    assert main(["sample", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1",
                 "--max_new_tokens=20", "--device=cpu", "--seed=1"]) == 0
    text = capsys.readouterr().out
    assert "ROMEO:" in text and set(text) <= set(chars) | {"-"}


def test_export_of_a_nanogpt_out_dir_loads_in_transformers(char_out_dir, tmp_path):
    import transformers

    out, source, chars = char_out_dir
    assert main(["export", str(out), "--format", "hf", str(tmp_path / "hf")]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                                 local_files_only=True)
    idx = torch.tensor([[chars.index(c) for c in "MENENIUS:"]])
    with torch.no_grad():
        diff = (hf_model.eval()(idx).logits - logits(source, idx, 65)).abs().max().item()
    print(f"max abs logit diff (nanoGPT ckpt.pt -> HF export): {diff:.3e}")
    assert diff <= 1e-4


@pytest.mark.slow
def test_sampling_a_nanogpt_out_dir_does_not_import_the_compiler(char_out_dir, tmp_path):
    """The model for assigned weights is built on the meta device without its random init;
    meta-device init would import torch._dynamo (~2 s of `folio sample` start-up)."""
    import subprocess
    import sys
    out, _, _ = char_out_dir
    code = ("import sys\nfrom folio.cli import main\n"
            f"main(['sample', '--out_dir={out}', '--max_new_tokens=3', '--device=cpu'])\n"
            "print('DYNAMO', 'torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("DYNAMO False")


def test_a_model_built_without_init_has_the_shape_and_no_values():
    from folio.speed.noinit import no_init
    with torch.device("meta"), no_init():
        model = GPT(GPTConfig(vocab_size=65, **SHAPE))
    assert model.lm_head.weight.is_meta and model.lm_head.weight.shape == (128, 32)
    assert model.num_params() == GPT(GPTConfig(vocab_size=65, **SHAPE)).num_params()
