"""Decoding on the CPU: packed linear layers decode like plain ones, and the measured choice
of dtype and packing respects explicit settings and is cached."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from folio.cli import main
from folio.infer.sample import generate_tokens
from folio.machine.device import cpu_supports_bf16
from folio.model.gpt import GPT, GPTConfig
from folio.speed import decoding
from folio.speed.packed import MIN_PACKED_ELEMENTS, PackedLinear, can_pack, decoding_copy

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch build has no oneDNN to pack weights for")


def wide_model(vocab_size: int = 1024, dropout: float = 0.0) -> GPT:
    """One block whose MLP weights (512 x 128) and head (1024 x 128) are large enough to pack,
    and whose attention weight (384 x 128) is not."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=1, n_head=4,
                          n_embd=128, bias=True, dropout=dropout))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # lively logits: greedy decoding does not settle on one token
    return model.eval()


def greedy(model: GPT, n: int = 40) -> list[int]:
    return list(generate_tokens(model, [1, 2, 3], n, temperature=1e-6, top_k=1))


def test_decoding_copy_decodes_like_the_model_and_leaves_it_untouched():
    model = wide_model(dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    packed = decoding_copy(model, pack=True)
    assert not any(isinstance(m, nn.Dropout) for m in packed.modules())
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    block = packed.transformer.h[0]
    assert isinstance(block.mlp.c_fc, PackedLinear) and isinstance(block.mlp.c_proj, PackedLinear)
    assert isinstance(packed.lm_head, PackedLinear)
    assert block.attn.c_attn.weight.numel() < MIN_PACKED_ELEMENTS
    assert isinstance(block.attn.c_attn, nn.Linear)  # small: left as it is
    assert all(type(m) is not PackedLinear for m in model.modules())
    assert packed.transformer.wte.weight is model.transformer.wte.weight  # shared, not copied
    x = torch.randint(1024, (2, 20))
    with torch.no_grad():
        cache, plain_cache = packed.new_cache(batch_size=2), model.new_cache(batch_size=2)
        torch.testing.assert_close(packed(x, cache=cache), model(x, cache=plain_cache),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(packed(x[:, :1], cache=cache),
                                   model(x[:, :1], cache=plain_cache), atol=1e-4, rtol=1e-4)
    assert greedy(packed) == greedy(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_model_without_large_layers_is_not_packed():
    tiny = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32))
    assert not can_pack(tiny)
    assert not any(k["packed"] for k in decoding.candidates(tiny, "auto").values())


def test_explicit_dtype_is_never_changed_for_decoding():
    model = wide_model()
    pinned = decoding.candidates(model, "float32")
    assert {k["dtype"] for k in pinned.values()} == {"float32"}
    assert {k["packed"] for k in pinned.values()} == {False, True}
    auto = decoding.candidates(model, "auto")
    assert next(iter(auto)) == "float32"  # the reference: the model as loaded
    assert ("bfloat16" in {k["dtype"] for k in auto.values()}) == cpu_supports_bf16()


def test_bfloat16_candidate_decodes_in_bfloat16_and_keeps_attention_in_float32():
    model = wide_model()
    twin = decoding.build(model, {"dtype": "bfloat16", "packed": False})
    assert twin.transformer.wte.weight.dtype == torch.bfloat16
    assert model.transformer.wte.weight.dtype == torch.float32  # the original is untouched
    cache = twin.new_cache()
    assert cache.keys.dtype == torch.float32  # the CPU's float32 attention kernels are faster
    x = torch.randint(1024, (1, 10))
    with torch.no_grad():
        full = twin(x)
        twin(x[:, :-1], cache=cache)
        step = twin(x[:, -1:], cache=cache)
    torch.testing.assert_close(step.float(), full.float(), atol=0.1, rtol=0.05)


def test_the_decoding_choice_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLIO_CACHE", str(tmp_path))
    model = wide_model()
    chosen, first = decoding.for_decoding(model, "auto", planned_tokens=2000)
    assert not first.cached and first.tuning_s > 0
    assert set(first.ms_per_step) == set(decoding.candidates(model, "auto"))
    assert str(chosen.transformer.wte.weight.dtype) == f"torch.{first.knobs['dtype']}"
    assert any(isinstance(m, PackedLinear) for m in chosen.modules()) == first.knobs["packed"]
    _, again = decoding.for_decoding(model, "auto", planned_tokens=2000)
    assert again.cached and again.knobs == first.knobs and "cached" in again.line


def test_folio_sample_names_how_it_decodes(tiny_run, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FOLIO_CACHE", str(tmp_path))
    assert main(["sample", str(tiny_run), "--device=cpu", "--num_samples=1",
                 "--max_new_tokens=5", "--dtype=float32"]) == 0
    err = capsys.readouterr().err
    assert "on cpu (float32: set)" in err  # nothing to measure: no layer worth packing


def test_folio_sample_counts_the_parameters_of_a_packed_model(char_data_dir, tmp_path, capsys,
                                                              monkeypatch):
    """Regression: the settings line counted the decoding copy's parameters, and packed
    layers hold none (a 0.80M model showed as 0.05M)."""
    from conftest import tiny_args

    from folio.infer.sample import load

    monkeypatch.setenv("FOLIO_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "wide"
    assert main(["train", *tiny_args(char_data_dir, run, max_iters=0), "--n_embd=128",
                 "--n_head=4"]) == 0
    monkeypatch.setattr(decoding, "candidates", lambda model, dtype: {
        "float32 + packed": {"dtype": "float32", "packed": True}})  # the one way: packed
    capsys.readouterr()
    assert main(["sample", str(run), "--device=cpu", "--num_samples=1", "--max_new_tokens=3",
                 "--dtype=float32"]) == 0
    err = capsys.readouterr().err
    assert "float32 + packed: set" in err
    assert f"{load(run, device='cpu')[0].num_params() / 1e6:.2f}M params" in err


@pytest.mark.parametrize("pack", [False, True], ids=["head only", "packed"])
def test_several_rows_at_once_decode_as_each_row_alone(pack):
    """A batched step's rows go through weights packed for several rows (made on first use):
    each row's output matches its own one-row output; a small head is not packed for rows."""
    twin = decoding_copy(wide_model(vocab_size=4096), pack=pack)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    layers = [twin.lm_head, twin.transformer.h[0].mlp.c_fc]
    with torch.no_grad():
        for layer in layers:
            alone = torch.cat([layer(x[i:i + 1]) for i in range(5)])
            torch.testing.assert_close(layer(x), alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer(x[:, None]), alone[:, None], atol=1e-5, rtol=1e-5)
    assert twin.lm_head.rows.packed is not None  # the head's packing for rows, made now
    c_fc = twin.transformer.h[0].mlp.c_fc  # the blocks' layers keep one packing
    assert not isinstance(c_fc, PackedLinear) or c_fc.rows is None
    assert decoding_copy(wide_model(vocab_size=65), pack=pack).lm_head.rows is None
