"""The GPT model: shapes, causality, initialisation, parameter counts, learning."""

from __future__ import annotations

import math

import pytest
import torch

from folio.model.gpt import GPT, GPTConfig


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
               bias=False)
    return GPT(GPTConfig(**{**cfg, **overrides}))


def test_vocabulary_is_padded_to_a_multiple_of_64():
    assert GPTConfig(vocab_size=50257).padded_vocab_size == 50304
    assert GPTConfig(vocab_size=65).padded_vocab_size == 128
    assert tiny().lm_head.weight.shape == (128, 32)


def test_forward_shapes_with_and_without_targets():
    model = tiny()
    idx = torch.randint(65, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 128) and loss.ndim == 0
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 128) and loss is None


def test_initial_loss_is_near_uniform():
    model = tiny()
    idx, targets = torch.randint(65, (2, 4, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(128)) < 0.1  # 128 padded logits, all near zero


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = tiny().eval()
    idx = torch.randint(65, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 65
    a = model.lm_head(model.hidden(idx))
    b = model.lm_head(model.hidden(changed))
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_input_and_output_embeddings_are_tied():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_residual_projections_use_scaled_init():
    model = GPT(GPTConfig(block_size=8, vocab_size=65, n_layer=8, n_head=2, n_embd=256))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 8)) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_seed_bpe_config_has_nanogpts_parameter_count():
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=4, n_head=4, n_embd=64,
                          bias=False))
    assert round(model.num_params() / 1e6, 2) == 3.42


def test_sequence_longer_than_block_size_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_tiny_model_overfits_one_batch():
    model = tiny()
    idx = torch.randint(65, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_crop_block_size_shrinks_the_position_table():
    model = tiny()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    assert model(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 1, 128)
