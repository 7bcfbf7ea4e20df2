"""The modern recipe: architecture options, Muon + AdamW, the wsd schedule, --recipe=modern."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_args
from test_train import straight_and_resumed

from folio.cli import main
from folio.cli.args import parse_args
from folio.config import TrainConfig
from folio.errors import ConfigError
from folio.infer.decode import CachedDecoder, RecomputeDecoder
from folio.infer.sample import generate_tokens
from folio.model.gpt import GPT, GPTConfig
from folio.store import hf
from folio.store.sources import load_model
from folio.train.optim import MuonAdamW, apply_schedule, configure_optimizer, lr_at
from folio.train.recipes import head_tied, resolve
from folio.watch.metrics import read_metrics

MODERN = dict(rope=True, norm="rmsnorm", qk_norm=True, mlp="relu2", tie_head=False,
              logit_softcap=15.0, zero_init_proj=True, bias=False)
OPTIONS = [dict(rope=True), dict(norm="rmsnorm"), dict(qk_norm=True), dict(mlp="relu2"),
           dict(tie_head=False), dict(logit_softcap=5.0), dict(zero_init_proj=True), MODERN]


def tiny_model(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32,
                         **options))


def lively(**options) -> GPT:
    """Larger weights, so greedy decoding does not repeat one token."""
    model = tiny_model(**{**options, "zero_init_proj": False})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_each_architecture_option_runs_forward_and_backward(options):
    model = tiny_model(**options)
    idx = torch.randint(0, 50, (2, 16))
    loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    # every parameter takes part: each gets a finite gradient
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert model(idx).shape == (2, model.config.vocab_size)


def test_rope_model_has_no_position_table_and_untied_head_is_its_own():
    model = tiny_model(rope=True, tie_head=False)
    assert "wpe" not in model.transformer
    assert model.lm_head.weight is not model.transformer.wte.weight


def test_rope_cached_logits_equal_a_full_forward_even_after_the_window_slides():
    model = lively(**MODERN)
    cached, full = CachedDecoder(model), RecomputeDecoder(model)
    window = [3, 1, 4, 1, 5]
    for token in [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 4, 4, 1]:
        torch.testing.assert_close(cached(window), full(window), rtol=1e-4, atol=1e-4)
        window = [*window, token][-16:]
    assert cached.cache.length == 16  # the window slid: rebuilt at position 0


def test_rope_greedy_generation_is_identical_with_and_without_the_cache():
    model = lively(**MODERN)
    args = (model, [1, 2, 3], 60)  # crosses block_size 16 several times
    cached = list(generate_tokens(*args, temperature=0, use_cache=True))
    assert cached == list(generate_tokens(*args, temperature=0, use_cache=False))
    assert len(set(cached)) > 5


def test_muon_takes_only_the_block_matrices():
    model = tiny_model(**MODERN)
    opt = configure_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3,
                                                 embed_lr=1e-2, head_lr=4e-3), "cpu")
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    blocks = {n for n, p in model.named_parameters() if n.startswith("transformer.h.")
              and p.dim() == 2}
    assert names == blocks and len(names) == 8
    adam = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert id(model.transformer.wte.weight) in adam and id(model.lm_head.weight) in adam
    apply_schedule(opt, 10_000, TrainConfig(optimizer="muon", learning_rate=1e-3,
                                            embed_lr=1e-2, head_lr=4e-3, decay_lr=False))
    assert sorted(round(g["lr"], 6) for g in opt.param_groups) == [0.004, 0.01, 0.02]


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    cfg = TrainConfig(lr_schedule="wsd", learning_rate=1.0, min_lr=0.1, warmup_iters=10,
                      max_iters=100, warmdown_frac=0.4)
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert lr_at(10, cfg) == lr_at(60, cfg) == pytest.approx(1.0)
    assert lr_at(80, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(i, cfg) for i in range(60, 101)]
    steps = [a - b for a, b in zip(lrs, lrs[1:], strict=False)]
    assert max(steps) == pytest.approx(min(steps))  # a straight line down


def resolved(*argv: str) -> tuple[TrainConfig, str]:
    parsed = parse_args(TrainConfig, list(argv))
    return resolve(parsed.config, parsed.given, "cpu")


def test_recipe_modern_fills_only_what_was_not_given():
    bare, note = resolved("--recipe=modern")
    assert bare.n_layer == 4 and "recipe modern" in note  # still the CPU preset's size
    assert bare.rope and bare.optimizer == "muon" and bare.lr_schedule == "wsd"
    cfg, _ = resolved("--recipe=modern", "--muon_lr=0.05", "--tie_head=True")
    assert cfg.muon_lr == 0.05 and cfg.tie_head is True and cfg.qk_norm
    assert cfg.warmup_iters == 0
    plain, _ = resolved("--n_layer=2")
    assert not plain.rope and plain.optimizer == "adamw" and plain.lr_schedule == "cosine"


def test_modern_head_is_untied_unless_it_outweighs_the_blocks():
    def tied(vocab: int, n_embd: int, n_layer: int, recipe: str = "modern") -> bool:
        return head_tied(TrainConfig(recipe=recipe, n_embd=n_embd, n_layer=n_layer,
                                     n_head=1), vocab)

    assert not tied(65, 128, 4)  # README CPU char model
    assert not tied(50304, 768, 12)  # GPT-2 small: the speedrun's untied head
    assert tied(50304, 64, 4)  # the seed's BPE shape: the head is most of it
    assert tied(65, 128, 4, recipe="nanogpt")  # GPT-2's tied head
    assert not head_tied(TrainConfig(recipe="nanogpt", tie_head=False), 65)  # given: kept


@pytest.mark.slow
def test_modern_recipe_ties_a_gpt2_vocabulary_head_on_a_small_model(tmp_path, capsys):
    from conftest import REPO

    from folio.store.sources import load_model

    data = tmp_path / "data"
    text = (REPO / "tests" / "data" / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    (tmp_path / "slice.txt").write_text(text)
    assert main(["prepare", str(tmp_path / "slice.txt"), "--name=bpe", "--tokenizer=gpt2",
                 f"--data_dir={data}"]) == 0
    common = ["--dataset=bpe", f"--data_dir={data}", "--recipe=modern", "--n_layer=1",
              "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--max_iters=2",
              "--eval_iters=1", "--device=cpu", "--compile=False"]
    assert main(["train", *common, f"--out_dir={tmp_path / 'auto'}"]) == 0
    assert "head untied unless it outweighs the blocks" in capsys.readouterr().out
    assert load_model(tmp_path / "auto")[0].config.tie_head
    assert main(["train", *common, f"--out_dir={tmp_path / 'given'}", "--tie_head=False"]) == 0
    assert not load_model(tmp_path / "given")[0].config.tie_head


@pytest.mark.slow
def test_modern_loss_goes_down_and_resume_with_muon_is_exact(char_data_dir, tmp_path, capsys):
    """N iterations + resume to 2N gives bitwise the losses of 2N straight, with Muon."""
    straight, _ = straight_and_resumed(char_data_dir, tmp_path, recipe="modern",
                                       muon_momentum_warmup=10)
    evals = read_metrics(straight).eval
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    info = json.loads((straight / "run.json").read_text())
    assert info["model"]["rope"] and info["config"]["optimizer"] == "muon"
    model, _, _ = load_model(straight)  # sampling loads the untied, rotary model
    assert model.config.rope and not model.config.tie_head
    with pytest.raises(ConfigError, match="rope=True has no exact transformers GPT-2"):
        hf.to_hf_state_dict(model)
    assert main(["export", str(straight), str(tmp_path / "hf")]) == 0  # as Apertus
    assert "ApertusForCausalLM" in (tmp_path / "hf" / "config.json").read_text()
    plain = tiny_args(char_data_dir, straight, max_iters=20)
    capsys.readouterr()
    assert main(["train", *plain, "--init_from=resume", "--recipe=nanogpt"]) != 0
    assert "trained with optimizer=muon (recipe=modern)" in capsys.readouterr().err
    # resumed without naming the recipe: it goes on with the one it was trained with
    assert main(["train", *plain, "--init_from=resume"]) == 0
    assert json.loads((straight / "run.json").read_text())["config"]["optimizer"] == "muon"


def test_old_run_json_without_the_new_model_fields_still_loads(tiny_run, tmp_path):
    info = json.loads((tiny_run / "run.json").read_text())
    for key in MODERN:
        if key != "bias":
            info["model"].pop(key, None)
    old = tmp_path / "old"
    old.mkdir()
    for f in tiny_run.iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    (old / "run.json").write_text(json.dumps(info))
    model, _, _ = load_model(old)
    assert not model.config.rope and model.config.tie_head and "wpe" in model.transformer
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("ns_dtype", [None, torch.bfloat16])
def test_batched_muon_matches_torch_muon(ns_dtype):
    """BatchedMuon is torch.optim.Muon's update (torch's runs in bfloat16: loose tolerance),
    with its Newton-Schulz iteration in float32 (the CPU default) or bfloat16."""
    from folio.train.optim import BatchedMuon
    torch.manual_seed(0)
    shapes = [(24, 8), (8, 24), (24, 8), (8, 8), (16, 8)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opts = [BatchedMuon(ours, lr=0.1, weight_decay=0.1, ns_dtype=ns_dtype),
            torch.optim.Muon(theirs, lr=0.1, weight_decay=0.1)]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for params, opt in zip((ours, theirs), opts, strict=True):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, theirs, strict=True):
        assert not torch.equal(a, b)  # different precision, so not bitwise
        torch.testing.assert_close(a, b, rtol=0, atol=0.01)  # each step moves them ~0.1
    assert opts[0].state_dict()["state"][0].keys() == opts[1].state_dict()["state"][0].keys()
