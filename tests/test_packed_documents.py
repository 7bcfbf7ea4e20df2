"""Packed documents (a chat run's conversations, each opened by <|endoftext|>): attention stays
within a document and positions restart at each, on the plain model and the CPU fast path."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import devices

from folio.model.gpt import GPT, GPTConfig, documents
from folio.speed.fastdropout import causal_attention, keep_mask
from folio.speed.kernels import PLAIN, Kernels, apply
from folio.train.step import TrainStep

START = 0  # the token that opens a document
GPT2 = dict()  # a position table, LayerNorm, GELU
MODERN = dict(rope=True, norm="rmsnorm", qk_norm=True, mlp="relu2", tie_head=False, bias=False)
# the CPU, and where this machine has one a GPU (its kernels take the mask another way)
KERNELS = [(PLAIN, "cpu")] + [(Kernels.for_device(d), d) for d in devices()]


def model(kernels: Kernels = PLAIN, dropout: float = 0.0, **shape) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=32,
                       dropout=dropout, **shape)
    return apply(GPT(config), kernels)


def conversation(n: int, low: int, seed: int) -> torch.Tensor:
    """n token ids from low..low+9, opened by START (1, n)."""
    ids = torch.randint(low, low + 10, (1, n), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = START
    return ids


def all_logits(m: GPT, idx: torch.Tensor, doc_start: int | None = None) -> torch.Tensor:
    device = m.transformer.wte.weight.device
    with torch.no_grad():
        return m.logits(m.hidden(idx.to(device), doc_start=doc_start)).cpu()  # (B, T, V)


def test_documents_give_positions_within_each_and_a_block_diagonal_causal_mask():
    idx = torch.tensor([[5, 0, 7, 8, 0, 9], [0, 3, 3, 3, 3, 0]])
    pos, mask = documents(idx, START)
    assert pos.tolist() == [[0, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 0]]
    assert mask.shape == (2, 1, 6, 6)
    first = [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0],
             [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]  # the window's head is a document too
    assert mask[0, 0].int().tolist() == first
    assert torch.equal(mask[1, 0, :5, :5], torch.ones(5, 5, dtype=torch.bool).tril())
    assert mask[1, 0, 5].int().tolist() == [0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("kernels, device", KERNELS,
                         ids=["plain", *(d for _, d in KERNELS[1:])])
@pytest.mark.parametrize("shape", [GPT2, MODERN], ids=["gpt2", "modern"])
def test_a_conversation_packed_after_another_has_its_logits_alone(shape, kernels, device):
    m = model(kernels, **shape).to(device).eval()
    a, b = conversation(11, 1, seed=1), conversation(9, 11, seed=2)
    packed = torch.cat([a, b], dim=1)  # (1, 20)
    alone = all_logits(m, b)  # (1, 9, V)
    masked = all_logits(m, packed, doc_start=START)[:, a.size(1):]
    torch.testing.assert_close(masked, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(all_logits(m, packed, START)[:, :a.size(1)], all_logits(m, a),
                               rtol=0, atol=1e-5)  # the first one is as it was
    unmasked = all_logits(m, packed)[:, a.size(1):]  # b sees a, and from position 11
    assert (unmasked - alone).abs().max() > 1e-2
    # a batch of rows packed differently: each row's documents on their own
    rows = torch.cat([packed, torch.cat([b, a], dim=1)])  # (2, 20)
    both = all_logits(m, rows, START)
    torch.testing.assert_close(both[1:, :b.size(1)], alone, rtol=0, atol=1e-5)
    assert m(packed.to(device), doc_start=START).shape == (1, 40)  # the next token's logits


def test_a_kv_cache_refuses_packed_documents():
    m = model().eval()
    with pytest.raises(ValueError, match="without a KV cache"):
        m(conversation(4, 1, 0), cache=m.new_cache(), doc_start=START)


@pytest.mark.parametrize("tiled", [False, True])
def test_tiled_dropout_attention_honours_the_document_mask(monkeypatch, tiled):
    import folio.speed.fastdropout as fd
    if tiled:  # several query blocks, tiles of sequences that span rows and heads
        monkeypatch.setattr(fd, "QUERY_BLOCK", 4)
        monkeypatch.setattr(fd, "CHUNK_BYTES", 4 * 4 * 14 * 5)
    B, nh, T, hs, p = 2, 3, 14, 8, 0.3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, nh, T, hs, generator=g).requires_grad_() for _ in range(3))
    upstream = torch.randn(B, nh, T, hs, generator=g)
    idx = torch.randint(1, 5, (B, T), generator=g)
    idx[0, [0, 6]], idx[1, [0, 3, 9]] = START, START
    _, mask = documents(idx, START)  # (B, 1, T, T)
    torch.manual_seed(5)
    got = causal_attention(q, k, v, p, mask)
    got_grads = torch.autograd.grad(got, (q, k, v), upstream)
    torch.manual_seed(5)
    seed = int(torch.randint(1 << 62, (1,)).item())  # the draw causal_attention makes
    att = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~mask, float("-inf"))
    if tiled:  # the same probabilities; each tile draws its own keep mask: compare without
        keep = torch.ones(B, nh, T, T)
        got = causal_attention(q, k, v, 1e-9, mask)
        got_grads = torch.autograd.grad(got, (q, k, v), upstream)
        p = 1e-9
    else:
        keep = keep_mask((B * nh, T, T), p, seed).view(B, nh, T, T)
    want = (att.softmax(-1) * keep / (1 - p)) @ v
    want_grads = torch.autograd.grad(want, (q, k, v), upstream)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("doc_start", [START, None], ids=["masked", "unmasked"])
def test_a_chat_step_on_the_fast_path_learns_nothing_across_conversations(doc_start):
    # conversation a's tokens (ids 1..10) only appear before b (ids 11..20), whose targets
    # alone carry loss: with the mask, no gradient reaches a's embedding rows (untied head),
    # through fast dropout, the fused loss and float32 attention under bfloat16 autocast
    m = model(Kernels.for_device("cpu"), dropout=0.1, **MODERN).train()
    a, b = conversation(12, 1, seed=3), conversation(12, 11, seed=4)
    x = torch.cat([a, b], dim=1).repeat(4, 1)  # (4, 24)
    y = torch.cat([x[:, 1:], x[:, :1]], dim=1)
    y[:, :a.size(1)] = -1  # no loss on a's targets
    before = m.transformer.wte.weight.detach().clone()
    optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
    step = TrainStep(m, m, optimizer, torch.device("cpu"), torch.bfloat16, 1.0,
                     torch.amp.GradScaler("cpu", enabled=False), doc_start)
    torch.manual_seed(0)
    loss = step(lambda: (x, y))
    assert torch.isfinite(loss)
    moved = (m.transformer.wte.weight.detach() - before).abs().sum(dim=1)  # (V,)
    assert moved[11:21].sum() > 0  # b learnt
    if doc_start is None:
        assert moved[1:11].sum() > 0  # a was attended to
    else:
        assert moved[1:11].sum() == 0
