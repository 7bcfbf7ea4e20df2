"""The GPT model: shapes, causality, initialisation, parameter counts, learning, its KV
cache and its kernels."""

from __future__ import annotations

import math

import pytest
import torch

from folio.model.gpt import GPT, GPTConfig
from folio.speed.fastdropout import FastDropout
from folio.speed.kernels import PLAIN, CpuAttention, Kernels, apply, kernels_of


def tiny(kernels: Kernels = PLAIN, **overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
               bias=False)
    return apply(GPT(GPTConfig(**{**cfg, **overrides})), kernels)


def test_vocabulary_is_padded_to_a_multiple_of_64():
    assert GPTConfig(vocab_size=50257).padded_vocab_size == 50304
    assert GPTConfig(vocab_size=65).padded_vocab_size == 128
    assert tiny().lm_head.weight.shape == (128, 32)


def test_forward_gives_the_loss_with_targets_and_next_token_logits_without():
    model = tiny()
    idx = torch.randint(65, (3, 16))
    loss = model(idx, idx)
    assert loss.shape == () and loss.requires_grad
    logits = model(idx)
    assert logits.shape == (3, 65)  # the table's 63 padding rows are cropped
    torch.testing.assert_close(logits, model.lm_head(model.hidden(idx))[:, -1, :65])


@pytest.mark.parametrize("fused_loss", [False, True])
def test_untrained_char_model_starts_at_the_log_of_its_real_vocabulary(fused_loss):
    model = tiny(kernels=Kernels(fused_loss=fused_loss))
    idx, targets = torch.randint(65, (2, 4, 16))
    loss = model(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.1  # not ln 128: padding rows are no tokens


@pytest.mark.parametrize("fused_loss", [False, True])
def test_loss_is_cross_entropy_over_the_cropped_logits(fused_loss):
    # regression: the 63 padding rows (zero here, as after an import) entered the softmax
    model = tiny(kernels=Kernels(fused_loss=fused_loss))
    with torch.no_grad():
        model.lm_head.weight[65:] = 0
    idx, targets = torch.randint(65, (2, 4, 16))
    logits = model.lm_head(model.hidden(idx))[..., :65]  # (B, T, 65)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 65), targets.reshape(-1))
    torch.testing.assert_close(model(idx, targets), want, atol=1e-6, rtol=0)


def test_padding_rows_get_no_gradient_from_the_loss():
    for fused_loss in (False, True):
        model = tiny(kernels=Kernels(fused_loss=fused_loss), tie_head=False)
        idx, targets = torch.randint(65, (2, 4, 16))
        model(idx, targets).backward()
        grad = model.lm_head.weight.grad
        assert grad[65:].abs().max() == 0 and grad[:65].abs().max() > 0


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
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_crop_block_size_shrinks_the_position_table():
    model = tiny()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 65)
    assert model.new_cache().capacity == 8


# ---------------------------------------------------------------------------- the KV cache

def test_cached_prefill_and_one_token_steps_give_the_full_forward_logits():
    model = tiny().eval()
    seq = torch.randint(65, (2, 12), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(batch_size=2)
    with torch.no_grad():
        got = [model(seq[:, :5], cache=cache)]  # prefill positions 0..4
        got += [model(seq[:, t:t + 1], cache=cache) for t in range(5, 12)]  # one at a time
        want = [model(seq[:, :t]) for t in range(5, 13)]
    assert cache.length == 12
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"after {t + 5} tokens")


def test_a_prefill_after_cached_tokens_sees_them_and_stays_causal():
    model = tiny().eval()
    seq = torch.randint(65, (1, 14), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache()
    with torch.no_grad():
        model(seq[:, :4], cache=cache)
        got = model.hidden(seq[:, 4:], cache)  # 10 new positions at once, after 4 cached
        want = model.hidden(seq)[:, 4:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_reset_cache_starts_again_at_position_zero():
    model = tiny().eval()
    a, b = torch.randint(65, (2, 1, 6), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache()
    with torch.no_grad():
        model(a, cache=cache)
        cache.reset()
        torch.testing.assert_close(model(b, cache=cache), model(b), rtol=1e-5, atol=1e-5)


def test_a_cache_cannot_grow_past_block_size():
    model = tiny().eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="17 tokens exceeds block_size 16"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------------------- kernels

KERNELS = [Kernels(), Kernels(fused_loss=True), Kernels(fast_dropout=True),
           Kernels(fused_loss=True, fast_dropout=True)]


@pytest.mark.parametrize("kernels", KERNELS)
def test_kernels_change_neither_the_return_types_nor_the_results(kernels):
    plain = tiny(dropout=0.1)
    torch.manual_seed(0)
    model = apply(GPT(plain.config), kernels)
    model.load_state_dict(plain.state_dict())
    idx = torch.randint(65, (2, 16), generator=torch.Generator().manual_seed(4))
    for m in (plain, model):
        m.eval()
    logits, loss = model(idx), model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (2, 65) and loss.shape == ()
    torch.testing.assert_close(logits, plain(idx))
    torch.testing.assert_close(loss, plain(idx[:, :-1], idx[:, 1:]))
    model.train()
    assert model(idx[:, :-1], idx[:, 1:]).shape == ()


def test_fast_dropout_kernel_builds_fast_dropout_layers_and_attention():
    fast = apply(GPT(GPTConfig(block_size=8, vocab_size=65, n_layer=2, n_head=2, n_embd=16,
                               dropout=0.1)), Kernels(fast_dropout=True))
    dropouts = [m for m in fast.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 5 and all(type(m) is FastDropout for m in dropouts)
    assert all(block.attn.attention.fast_dropout for block in fast.transformer.h)
    assert kernels_of(fast) == Kernels(fast_dropout=True)
    plain = apply(fast, PLAIN)  # and back: the model's own modules
    assert not any(isinstance(m, FastDropout) for m in plain.modules())
    assert not any(isinstance(block.attn.attention, CpuAttention)
                   for block in plain.transformer.h)
    assert kernels_of(plain) == PLAIN


def test_kernels_are_chosen_for_the_device():
    assert Kernels.for_device("cpu") == Kernels(fused_loss=True, fast_dropout=True,
                                                float32_attention=True)
    assert Kernels.for_device("cuda") == Kernels.for_device("mps") == Kernels()
