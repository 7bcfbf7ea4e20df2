"""The fast CPU path computes the same loss and gradients as nanoGPT's plain math."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from folio.cli import main
from folio.model.gpt import GPT, GPTConfig
from folio.speed.fastdropout import causal_attention, dropout, keep_mask
from folio.speed.fastloss import fused_linear_cross_entropy
from folio.speed.kernels import PLAIN, Kernels, apply

BF16 = dict(rtol=3e-2, atol=3e-2)  # bf16 keeps 8 bits of mantissa


def head_inputs(n: int = 37, c: int = 16, v: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).requires_grad_()
    w = torch.randn(v, c, generator=g).mul_(0.3).requires_grad_()
    y = torch.randint(v, (n,), generator=g)
    y[[3, 11]] = -1  # ignored positions, as nanoGPT's ignore_index=-1
    return h, w, y


def reference_loss_and_grads(h, w, y):
    loss = F.cross_entropy(h @ w.t(), y, ignore_index=-1)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


@pytest.mark.parametrize("rows", [1, 8, 37, 1000])
def test_fused_loss_and_gradients_match_cross_entropy_in_float32(rows):
    h, w, y = head_inputs()
    want, want_h, want_w = reference_loss_and_grads(h, w, y)
    loss = fused_linear_cross_entropy(h, w, y, rows=rows)
    got_h, got_w = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-7)


def test_fused_loss_under_bf16_autocast_matches_float32_within_bf16_precision():
    h, w, y = head_inputs(n=64, c=32, v=300)
    want, want_h, want_w = reference_loss_and_grads(h, w, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, y, rows=16)
    got_h, got_w = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and got_w.dtype == torch.float32
    torch.testing.assert_close(loss, want, **BF16)
    scale_h, scale_w = want_h.abs().max(), want_w.abs().max()
    torch.testing.assert_close(got_h / scale_h, want_h / scale_h, **BF16)
    torch.testing.assert_close(got_w / scale_w, want_w / scale_w, **BF16)


def test_fused_loss_scales_gradients_by_the_upstream_gradient():
    h, w, y = head_inputs()
    _, want_h, want_w = reference_loss_and_grads(h, w, y)
    got_h, got_w = torch.autograd.grad(fused_linear_cross_entropy(h, w, y, rows=8) / 4, (h, w))
    torch.testing.assert_close(got_h, want_h / 4)
    torch.testing.assert_close(got_w, want_w / 4)


def test_fused_loss_backward_scales_by_the_upstream_gradient_without_a_host_sync():
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostSyncs(TorchDispatchMode):
        """Records the ops that copy a tensor's value to Python (.item(), bool(t), ...)."""

        def __init__(self):
            super().__init__()
            self.syncs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.syncs.append(func)
            return func(*args, **(kwargs or {}))

    h, w, y = head_inputs()
    _, want_h, want_w = reference_loss_and_grads(h, w, y)
    for scale in (1.0, 0.25):
        loss = fused_linear_cross_entropy(h, w, y, rows=8) * scale
        with HostSyncs() as mode:
            got_h, got_w = torch.autograd.grad(loss, (h, w))
        assert mode.syncs == []
        torch.testing.assert_close(got_h, want_h * scale)
        torch.testing.assert_close(got_w, want_w * scale)


def test_fused_loss_refuses_a_second_backward_rather_than_scaling_twice():
    h, w, y = head_inputs()
    loss = fused_linear_cross_entropy(h, w, y, rows=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_fused_loss_without_gradients_gives_the_same_value():
    h, w, y = head_inputs()
    want, _, _ = reference_loss_and_grads(h, w, y)
    with torch.inference_mode():
        loss = fused_linear_cross_entropy(h, w, y, rows=5)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


def test_fused_loss_is_exact_for_a_target_whose_probability_underflows():
    h, w = torch.ones(8, 4), torch.zeros(50, 4)
    w[7] = -50.0  # token 7's logit is -200, the others 0: its softmax exp(-200) is 0 in float32
    y = torch.full((8,), 7)
    want = F.cross_entropy(h @ w.t(), y)  # 200 + log(49)
    torch.testing.assert_close(fused_linear_cross_entropy(h, w, y, rows=4), want)


def tiny_gpt(dropout: float = 0.0, vocab_size: int = 300,
             kernels: Kernels = PLAIN) -> GPT:
    """The same weights whatever the kernels."""
    torch.manual_seed(0)
    return apply(GPT(GPTConfig(block_size=16, vocab_size=vocab_size, n_layer=2, n_head=2,
                               n_embd=32, dropout=dropout, bias=False)), kernels)


def loss_and_grads(model: GPT, x, y, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def batch(vocab_size: int = 300):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(vocab_size, (4, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


@pytest.fixture
def small_chunks(monkeypatch):
    """Blocks of 10 rows and softmax chunks of 4, so a tiny model's 64 positions take many."""
    import folio.speed.fastloss
    monkeypatch.setattr(folio.speed.fastloss, "BLOCK_BYTES", 4 * 320 * 10)
    monkeypatch.setattr(folio.speed.fastloss, "SOFTMAX_BYTES", 4 * 320 * 4)


def test_model_with_fused_loss_matches_the_plain_path_in_float32(small_chunks):
    x, y = batch()
    want, want_grads = loss_and_grads(tiny_gpt(), x, y)
    got, got_grads = loss_and_grads(tiny_gpt(kernels=Kernels(fused_loss=True)), x, y)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_model_fast_path_in_bf16_matches_float32_eager_within_bf16_precision(small_chunks):
    x, y = batch()
    want, want_grads = loss_and_grads(tiny_gpt(), x, y)
    fast = tiny_gpt(kernels=Kernels.for_device("cpu"))
    got, got_grads = loss_and_grads(fast, x, y, torch.bfloat16)
    torch.testing.assert_close(got, want, **BF16)
    for name, grad in want_grads.items():
        cosine = F.cosine_similarity(got_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name


def test_fast_dropout_model_matches_the_plain_path_when_not_training():
    x, y = batch()
    want, _ = loss_and_grads(tiny_gpt(dropout=0.2).eval(), x, y)
    got, _ = loss_and_grads(tiny_gpt(dropout=0.2, kernels=Kernels(fast_dropout=True)).eval(),
                            x, y)
    assert got == want


def test_a_model_built_with_fast_dropout_draws_masks_that_replay_under_manual_seed():
    x, y = batch()
    fast = tiny_gpt(dropout=0.2, kernels=Kernels(fast_dropout=True))
    with torch.no_grad():
        no_dropout = fast.eval()(x, y)
        fast.train()
        torch.manual_seed(1)
        a, b = fast(x, y), fast(x, y)
        torch.manual_seed(1)
        assert torch.equal(fast(x, y), a)
    assert len({no_dropout.item(), a.item(), b.item()}) == 3


def test_keep_mask_drops_the_requested_fraction_and_replays_from_its_seed():
    mask = keep_mask((1000, 1000), 0.2, seed=7)
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.8) < 2e-3
    assert torch.equal(mask, keep_mask((1000, 1000), 0.2, seed=7))
    assert not torch.equal(mask, keep_mask((1000, 1000), 0.2, seed=8))


def test_fast_dropout_scales_kept_values_and_their_gradient():
    x = torch.randn(64, 100, requires_grad=True)
    out = dropout(x, 0.25)
    out.sum().backward()
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    torch.testing.assert_close(x.grad, kept.float() / 0.75)


def test_fast_dropout_replays_under_manual_seed():
    x = torch.randn(8, 32)
    torch.manual_seed(3)
    a = dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.5))


def test_causal_attention_with_dropout_matches_the_math_with_the_same_mask():
    B, nh, T, hs, p = 2, 3, 16, 8, 0.3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, nh, T, hs, generator=g).requires_grad_() for _ in range(3))
    upstream = torch.randn(B, nh, T, hs, generator=g)
    torch.manual_seed(5)
    got = causal_attention(q, k, v, p)
    got_grads = torch.autograd.grad(got, (q, k, v), upstream)
    torch.manual_seed(5)
    seed = int(torch.randint(1 << 62, (1,)).item())  # the draw causal_attention makes
    keep = keep_mask((B * nh, T, T), p, seed).view(B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    att = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(future, float("-inf"))
    want = (att.softmax(-1) * keep / (1 - p)) @ v
    want_grads = torch.autograd.grad(want, (q, k, v), upstream)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tiled_causal_attention_matches_sdpa_when_nothing_is_dropped(monkeypatch):
    import folio.speed.fastdropout as fd
    monkeypatch.setattr(fd, "QUERY_BLOCK", 4)  # 5 query blocks, the last one short
    monkeypatch.setattr(fd, "CHUNK_BYTES", 4 * 4 * 18 * 2)  # 2 sequences per tile
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 18, 8, generator=g).requires_grad_() for _ in range(3))
    upstream = torch.randn(2, 3, 18, 8, generator=g)
    got = causal_attention(q, k, v, 1e-9)  # keeps every element: plain causal attention
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_grads = torch.autograd.grad(got, (q, k, v), upstream)
    want_grads = torch.autograd.grad(want, (q, k, v), upstream)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_causal_attention_in_bf16_matches_float32_within_bf16_precision():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(3))
    torch.manual_seed(1)
    want = causal_attention(q, k, v, 0.1)
    torch.manual_seed(1)
    got = causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, **BF16)


def test_causal_attention_without_dropout_is_sdpa():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v, 0.0), want)


# ---------------------------------------------------------------------------- folio bench

def folio(*args: str, cache=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cache is not None:
        env["FOLIO_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "folio", *args], env=env, text=True,
                          capture_output=True, timeout=600)


def test_bench_help_lists_its_options(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--cases", "--steps", "--quality"):
        assert option in out


def test_bench_unknown_case_is_a_one_line_error(capsys):
    assert main(["bench", "--cases", "cpu_chars"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("folio: error:") and "cpu_char" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_short_bench_prints_one_json_line_per_case_with_both_paths(seeded_cache, tmp_path):
    proc = folio("bench", "--cases", "cpu_char", "--steps", "2", "--data_dir",
                 str(tmp_path / "data"), cache=seeded_cache)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["case"] == "cpu_char" and line["tokens_per_iter"] == 12 * 64
    for path in ("eager", "fast"):
        result = line[path]
        for key in ("ms_per_iter", "tokens_per_sec", "mfu", "peak_rss_mb", "loss", "dtype",
                    "compile", "fused_loss", "warmup_s", "threads"):
            assert key in result, (path, key)
        assert result["steps"] == 2 and math.isfinite(result["loss"])
    assert line["eager"]["dtype"] == "float32" and line["eager"]["fused_loss"] is False
    # folio's default is what the trainer measured fastest on this machine, and says so
    assert isinstance(line["fast"]["fused_loss"], bool) and line["fast"]["choice"]
    assert line["fast"]["choice"].startswith(line["fast"]["dtype"])
    assert line["cpu"]["model"] and isinstance(line["cpu"]["flags"], list) and line["torch"]
    # both paths train the same model on the same batches
    assert line["fast"]["loss"] == pytest.approx(line["eager"]["loss"], abs=0.05)
    # the ratios are of the two paths' own figures (fast over eager)
    eager, fast = line["eager"], line["fast"]
    assert line["speedup"] == pytest.approx(fast["tokens_per_sec"] / eager["tokens_per_sec"],
                                            abs=0.006)
    assert line["rss_ratio"] == pytest.approx(fast["peak_rss_mb"] / eager["peak_rss_mb"],
                                              abs=0.006)
    bound_ms = fast["gflops_per_iter"] / fast["peak_gflops"] * 1000
    assert line["speedup_ceiling"] == pytest.approx(eager["ms_per_iter"] / bound_ms, rel=0.01,
                                                    abs=0.006)


@pytest.mark.slow
def test_bench_variant_this_machine_refuses_is_reported_in_its_json_line(seeded_cache, tmp_path):
    proc = folio("bench", "--cases", "cpu_char", "--steps", "1", "--variants",
                 "fast:dtype=float16", "--data_dir", str(tmp_path / "data"), cache=seeded_cache)
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout)
    assert "float16 is not supported" in line["fast:dtype=float16"]["error"]
    assert "Traceback" not in proc.stderr


def test_cpu_attention_runs_in_float32_under_bfloat16_autocast():
    """The CPU kernels compute attention (forward and backward) in float32 under bfloat16
    autocast; plain kernels leave it to autocast (bfloat16). The loss stays bfloat16-close."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class AttentionDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[torch.dtype] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__:
                self.seen.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    x, y = batch()
    want, _ = loss_and_grads(tiny_gpt(), x, y)
    for kernels, dtype in ((Kernels(float32_attention=True), torch.float32),
                           (PLAIN, torch.bfloat16)):
        with AttentionDtypes() as mode:
            loss, grads = loss_and_grads(tiny_gpt(kernels=kernels), x, y, torch.bfloat16)
        assert mode.seen == {dtype}, kernels
        assert abs(loss.item() - want.item()) < 0.02 and all(g.isfinite().all()
                                                               for g in grads.values())
