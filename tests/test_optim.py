"""Learning-rate schedule endpoints and AdamW parameter groups."""

from __future__ import annotations

import pytest

from folio.config import TrainConfig
from folio.model.gpt import GPT, GPTConfig
from folio.train.optim import configure_optimizer, lr_at

CFG = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=1000)


def test_warmup_starts_small_and_reaches_the_peak():
    assert lr_at(0, CFG) == pytest.approx(1e-3 / 101)
    assert lr_at(99, CFG) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, CFG) == pytest.approx(1e-3)


def test_cosine_decays_to_min_lr_then_stays():
    assert lr_at(550, CFG) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(1000, CFG) == pytest.approx(1e-4)
    assert lr_at(5000, CFG) == pytest.approx(1e-4)
    lrs = [lr_at(i, CFG) for i in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_decay_lr_false_keeps_the_learning_rate():
    cfg = TrainConfig(learning_rate=3e-5, decay_lr=False)
    assert lr_at(0, cfg) == lr_at(10_000, cfg) == 3e-5


def test_weight_decay_applies_to_matrices_only():
    model = GPT(GPTConfig(block_size=8, vocab_size=65, n_layer=2, n_head=2, n_embd=16,
                          bias=True))
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    counted = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert counted == model.num_params(non_embedding=False)  # tied weights counted once
