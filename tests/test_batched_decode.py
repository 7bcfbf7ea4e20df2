"""Batched decoding: rows of a `RowCache` at positions of their own, the `BatchDecoder`'s
prefills and slides, and the server's engine: one forward pass per step over every request,
each request's text the one it gets alone, a newcomer's first token within two steps."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import devices

from folio.data.tokenizer import CharTokenizer
from folio.infer.decode import BatchDecoder, slide
from folio.infer.sample import draw, generate_tokens, sample_token, sample_tokens
from folio.infer.serve.engine import Engine, Job
from folio.infer.serve.runs import LoadedModel
from folio.model.cache import RowCache
from folio.model.gpt import GPT, GPTConfig
from folio.store.rundir import RunInfo

CHARS = sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
BLOCK = 16


def tiny(rope: bool = False, device: str = "cpu") -> GPT:
    """A random 2-layer model with lively logits (weights scaled up), so greedy text varies
    and near-ties between tokens are rare."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=BLOCK, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32,
                    rope=rope, norm="rmsnorm" if rope else "layernorm")
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model.to(device).eval()


def seq(n: int, seed: int) -> list[int]:
    return torch.randint(len(CHARS), (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(model: GPT, tokens: list[int]) -> torch.Tensor:
    """The reference: a plain forward pass over the whole window."""
    with torch.no_grad():
        return model(torch.tensor([tokens], device=model.transformer.wte.weight.device))[0]


def check_and_push(model: GPT, decoder: BatchDecoder[int], windows: dict[int, list[int]],
                   logits: torch.Tensor, step: int) -> None:
    """Each row's logits are its window's full pass's; then a token for each row, its window
    sliding as generate_tokens slides it."""
    for row, owner in enumerate(decoder.owners):
        torch.testing.assert_close(logits[row], full_logits(model, windows[owner]),
                                   rtol=1e-5, atol=1e-5, msg=f"step {step}, row {owner}")
        token = (7 * step + owner) % len(CHARS)
        decoder.push(row, token)
        windows[owner] = slide(windows[owner] + [token], BLOCK)


# ---------------------------------------------------------------------------- the model

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rope", [False, True], ids=["learned positions", "rotary"])
def test_each_row_of_a_step_gets_its_own_windows_logits(rope, device):
    model = tiny(rope, device)
    decoder: BatchDecoder[int] = BatchDecoder(model)
    windows = {i: seq(n, i) for i, n in enumerate([1, 4, 9, BLOCK])}  # a full block too
    for i, w in windows.items():
        decoder.add(w, i)
    for step in range(2 * BLOCK):  # every row slides at least once
        if step == 3:  # a newcomer joins rows already decoding (its prefill in the step)
            windows[9] = seq(6, 9)
            decoder.add(windows[9], 9)
        if step == 5:  # a row leaves: the last row moves into its place
            row = decoder.owners.index(1)
            decoder.remove([row])
            del windows[1]
            assert decoder.owners[row] == 9 and decoder.rows == len(windows)
        logits = decoder.step()
        assert logits.shape == (len(windows), len(CHARS))
        check_and_push(model, decoder, windows, logits, step)


@pytest.mark.parametrize("rows", [1, 3])
def test_rows_of_one_length_start_and_slide_in_the_steps_own_pass(rows):
    # a lone request, or requests that began together, (re)fill their caches in the step's
    # own pass over their whole windows: the full window's logits, one pass a step
    model = tiny()
    decoder: BatchDecoder[int] = BatchDecoder(model)
    windows = {i: seq(5, i) for i in range(rows)}
    for i, w in windows.items():
        decoder.add(w, i)
    passes = []  # the embedding runs once a pass (a hook the reference passes share)
    decoder.model.transformer.wte.register_forward_hook(lambda *_: passes.append(1))
    steps_passes = 0
    for step in range(2 * BLOCK):  # slides at least once
        logits = decoder.step()
        steps_passes += len(passes)
        check_and_push(model, decoder, windows, logits, step)
        passes.clear()
    assert steps_passes == 2 * BLOCK


def test_a_row_cache_writes_each_row_at_its_length_and_masks_the_rest():
    cache = RowCache(n_layer=1, n_head=1, head_size=2, capacity=8, dtype=torch.float32,
                     device=torch.device("cpu"))
    for length in (3, 1, 5):
        cache.filled(cache.add_row(), cache.rows, length)
    assert cache.positions(1, torch.device("cpu")).tolist() == [[3], [1], [5]]
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 1, 2)  # row b's new key: b
    keys, _ = cache.update(0, k, k)
    assert keys.shape == (3, 1, 6, 2)  # up to the longest row's new position
    assert [keys[b, 0, pos, 0].item() for b, pos in enumerate((3, 1, 5))] == [0, 1, 2]
    seen = cache.mask(1)[:, 0, 0] == 0  # 0 added to the scores it sees, -inf to the rest
    assert seen.tolist() == [[j <= n for j in range(6)] for n in (3, 1, 5)]
    cache.advance(1)
    assert cache.lengths == [4, 2, 6]
    cache.remove_row(0)  # the last row moves into slot 0, its keys with it
    assert cache.lengths == [6, 2] and cache.keys[0, 0, 0, 5, 0] == 2
    cache.filled(1, 2, 6)
    assert cache.mask(1) is None  # rows of one length: the plain causal pattern, no mask


def test_rows_slide_as_generate_tokens_slides():
    """Past block_size a row's window drops a quarter and is prefilled again, as the
    unbatched decoder does: greedy tokens agree over several slides."""
    model = tiny()
    prompts = [seq(30, 1), seq(2, 2), seq(BLOCK, 3)]  # longer than a block, short, a block
    want = [list(generate_tokens(model, p, 3 * BLOCK, temperature=0)) for p in prompts]
    decoder: BatchDecoder[int] = BatchDecoder(model)
    for i, p in enumerate(prompts):
        decoder.add(p, i)
    got: list[list[int]] = [[] for _ in prompts]
    for _ in range(3 * BLOCK):
        logits = decoder.step()
        for row, owner in enumerate(decoder.owners):
            token = int(logits[row].argmax())
            got[owner].append(token)
            decoder.push(row, token)
    assert got == want
    assert len(set(map(tuple, got))) == 3


def test_rows_sampled_together_draw_what_each_draws_alone():
    logits = 3 * torch.randn(7, 300, generator=torch.Generator().manual_seed(0))
    settings = [(0.0, None, 1.0), (1.0, None, 1.0), (0.8, 20, 1.0), (1.0, None, 0.9),
                (0.8, 20, 1.0), (1.2, 50, 0.8), (0.8, 20, 1.0)]  # groups of 1 and 3 rows
    for seed in range(0, 200, 7):
        together = sample_tokens(logits, settings, [torch.Generator().manual_seed(seed + r)
                                                    for r in range(7)])
        alone = [sample_token(logits[r], *settings[r], torch.Generator().manual_seed(seed + r))
                 for r in range(7)]
        assert together == alone
    assert len(set(together)) > 3


def test_the_batched_draw_is_torch_multinomials_draw_for_every_row():
    """`draw` races each row's exponential noise against its probabilities in one op: the
    index multinomial picks and the generator left where multinomial leaves it, so seeded
    texts are those of the per-row sampler before it."""
    probs = torch.softmax(2 * torch.randn(6, 65, generator=torch.Generator().manual_seed(1)), -1)
    probs[5] = 0.0
    probs[5, [3, 60]] = 0.5  # a row with zeros and a tie
    for seed in range(50):
        ours = [torch.Generator().manual_seed(seed + r) for r in range(6)]
        theirs = [torch.Generator().manual_seed(seed + r) for r in range(6)]
        for _ in range(3):  # consecutive draws: each generator advanced as multinomial does
            want = [int(torch.multinomial(probs[r], 1, generator=theirs[r])) for r in range(6)]
            assert draw(probs, ours).tolist() == want
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs, strict=True))
    with pytest.raises(RuntimeError, match="nan"):
        draw(torch.full((1, 4), float("nan")), [None])


# ---------------------------------------------------------------------------- the engine

class Collected:
    """A job's events: texts and finish reasons per choice, and the engine step at which
    its first text arrived."""

    def __init__(self, engine: Engine, n: int) -> None:
        self.engine, self.texts, self.ends = engine, [""] * n, [None] * n
        self.first_step: int | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def __call__(self, event: tuple) -> None:
        if event[0] == "text":
            if self.first_step is None:
                self.first_step = self.engine.steps
            self.texts[event[1]] += event[2]
        elif event[0] == "end":
            self.ends[event[1]] = event[2:]
        else:
            assert event[0] in ("done", "error"), event
            self.error = event[1] if event[0] == "error" else None
            self.done.set()


# prompt, max_tokens, temperature, top_k, top_p, stop, seed, n: prompts of 1..40 characters
# (longer than the block), greedy and sampled, answers past block_size (windows slide)
REQUESTS = [
    ("\n", 40, 1.0, None, 1.0, [], 0, 1),
    ("ROMEO:", 24, 0.0, None, 1.0, [], None, 1),
    ("To be, or not to be, that is the question:", 30, 0.8, 10, 1.0, [], 5, 1),
    ("KING", 35, 1.2, None, 0.9, [], 11, 2),
    ("a", 8, 1.0, 3, 1.0, [], 3, 1),
    ("First Citizen:\nBefore we proceed", 50, 0.0, None, 1.0, [], None, 1),
    ("JULIET:\nO", 28, 1.0, None, 1.0, ["!h"], 7, 1),  # alone: "WG!'ml!hoq..."
    ("What", 33, 0.7, 40, 0.95, [], 123456789, 1),
]


def loaded_tiny(device: str = "cpu") -> LoadedModel:
    model = tiny(device=device)
    info = RunInfo(model=model.config.to_dict(), tokenizer={"kind": "char", "chars": CHARS})
    return LoadedModel("tiny", model, CharTokenizer(CHARS), info, ())


def job(loaded: LoadedModel, request: tuple, emit: Collected) -> Job:
    prompt, max_tokens, temperature, top_k, top_p, stop, seed, n = request
    return Job(loaded, loaded.tokenizer.encode(prompt), max_tokens, temperature, top_k, top_p,
               stop, seed, n, emit)


def wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def alone(loaded: LoadedModel, batch: bool) -> list[Collected]:
    """Each request on its own, one after another."""
    engine = Engine(max_active=1, queue_size=0, batch=batch)
    results = []
    try:
        for request in REQUESTS:
            got = Collected(engine, request[-1])
            assert engine.submit(job(loaded, request, got))
            assert got.done.wait(60)
            results.append(got)
    finally:
        engine.close()
    return results


@pytest.mark.parametrize("device", devices())
def test_concurrent_requests_get_the_text_each_gets_alone(device):
    """Eight requests (different prompts, lengths, seeds and settings), arriving while others
    decode, batched into one forward pass per step: each one's text, finish reason and token
    count are those of the request run alone, batched or by the one-at-a-time engine."""
    loaded = loaded_tiny(device)
    engine = Engine(max_active=8, queue_size=0)
    together = [Collected(engine, r[-1]) for r in REQUESTS]
    try:
        for i, request in enumerate(REQUESTS):
            if i in (3, 6):  # later arrivals join a batch that is decoding
                wait(lambda start=engine.steps: engine.steps >= start + 3)
            assert engine.submit(job(loaded, request, together[i]))
        for got in together:
            assert got.done.wait(60)
    finally:
        engine.close()
    wanted = alone(loaded, batch=False)
    assert [g.texts for g in together] == [w.texts for w in wanted]
    assert [g.ends for g in together] == [w.ends for w in wanted]
    assert [g.texts for g in alone(loaded, batch=True)] == [w.texts for w in wanted]
    assert together[1].ends == [("length", 24)] and together[6].ends[0][0] == "stop"
    assert len({t for g in together for t in g.texts}) == 9  # 9 choices, all different


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "in turn"])
def test_a_client_told_done_finds_its_slot_free(batch):
    # regression: "done" was emitted before the job left its slot, so a client that sent
    # its next request on "done" to a full server could be refused (429) for a moment
    loaded = loaded_tiny()
    engine = Engine(max_active=1, queue_size=0, batch=batch)
    accepted: list[bool] = []

    def emit(event: tuple) -> None:  # the decoding thread: a job is done, submit the next
        if event[0] == "done" and len(accepted) < 3:
            accepted.append(engine.submit(job(loaded, REQUESTS[4], emit)))
    try:
        assert engine.submit(job(loaded, REQUESTS[4], emit))
        wait(lambda: len(accepted) == 3 or False in accepted)
    finally:
        engine.close()
    assert accepted == [True, True, True]


def test_a_request_arriving_under_load_gets_its_first_token_within_two_steps():
    loaded = loaded_tiny()
    engine = Engine(max_active=8, queue_size=0)
    busy = [Collected(engine, 1) for _ in range(7)]
    try:
        for i, got in enumerate(busy):  # seven long answers keep the engine decoding
            assert engine.submit(job(loaded, ("ROMEO:", 10**6, 1.0, None, 1.0, [], i, 1), got))
        wait(lambda: all(g.first_step is not None for g in busy))
        late = Collected(engine, 1)
        submitted = engine.steps
        assert engine.submit(job(loaded, ("To be, or not to be", 5, 1.0, None, 1.0, [], 0, 1),
                                 late))
        assert late.done.wait(60)
        assert late.first_step - submitted <= 2
        assert engine.load()["active"] == 7  # the others still decode
    finally:
        engine.close()


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on():
    loaded = loaded_tiny()
    engine = Engine(max_active=2, queue_size=0)
    long, short = Collected(engine, 1), Collected(engine, 1)
    long_job = job(loaded, ("ROMEO:", 10**6, 1.0, None, 1.0, [], 0, 1), long)
    try:
        assert engine.submit(long_job)
        assert engine.submit(job(loaded, ("KING", 20, 1.0, None, 1.0, [], 0, 1), short))
        wait(lambda: long.first_step is not None)
        long_job.cancelled.set()
        assert short.done.wait(60) and short.ends == [("length", 20)]
        wait(lambda: engine.load()["active"] == 0)
        assert not long.done.is_set()  # a cancelled job emits nothing more
    finally:
        engine.close()


def test_a_model_that_fails_fails_its_own_requests_only():
    good, bad = loaded_tiny(), loaded_tiny()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    bad.model.hidden = broken  # its decoding copy (a shallow copy) keeps it
    engine = Engine(max_active=4, queue_size=0)
    fine, failed = Collected(engine, 1), Collected(engine, 2)
    try:
        assert engine.submit(job(good, ("ROMEO:", 30, 1.0, None, 1.0, [], 0, 1), fine))
        assert engine.submit(job(bad, ("KING", 30, 1.0, None, 1.0, [], 0, 2), failed))
        assert failed.done.wait(60) and fine.done.wait(60)
        assert "RuntimeError: boom" in failed.error and failed.texts == ["", ""]
        assert fine.error is None and fine.ends == [("length", 30)]
        wait(lambda: engine.load()["active"] == 0)
    finally:
        engine.close()
