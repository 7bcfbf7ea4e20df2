"""Sampling: KV cache vs recompute, filtering, stop strings, UTF-8 streaming, the CLI."""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import pytest
import torch

from folio.cli import main
from folio.data.tokenizer import CharTokenizer, GPT2Tokenizer
from folio.errors import ConfigError
from folio.infer.decode import CachedDecoder, RecomputeDecoder
from folio.infer.sample import (
    SEPARATOR,
    TextStream,
    generate,
    generate_tokens,
    load,
    sample_token,
    top_k_candidates,
    top_p_candidates,
)
from folio.model.gpt import GPT, GPTConfig


@pytest.fixture(scope="module")
def trained(tiny_run):
    return load(tiny_run, device="cpu")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["sample", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lively_model(vocab_size: int = 50, block_size: int = 16, **shape) -> GPT:
    """A random model with large weights, so greedy decoding does not repeat one token."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2,
                          n_embd=32, **shape))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model.eval()


# ---------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("prompt_len", [1, 7, 16, 40])  # block_size is 16
def test_greedy_output_is_identical_with_and_without_the_cache(prompt_len):
    model = lively_model()
    prompt = torch.randint(0, 50, (prompt_len,), generator=torch.Generator().manual_seed(1))
    args = (model, prompt.tolist(), 60)  # crosses the crop boundary several times
    cached = list(generate_tokens(*args, temperature=0, use_cache=True))
    recomputed = list(generate_tokens(*args, temperature=0, use_cache=False))
    assert cached == recomputed
    assert len(set(cached)) > 5  # a real test: the output is not one repeated token


def test_greedy_output_of_a_trained_model_matches_across_the_crop_boundary(trained):
    model, tokenizer = trained  # block_size 32
    for prompt in ("ROMEO:", "First Citizen:\nBefore we proceed any further, hear me spea"):
        texts = ["".join(generate(model, tokenizer, prompt, 80, temperature=0, use_cache=c))
                 for c in (True, False)]
        assert texts[0] == texts[1]


def test_cached_logits_match_a_full_forward_pass():
    model = lively_model()
    cached, full = CachedDecoder(model), RecomputeDecoder(model)
    window = [3, 1, 4, 1, 5]
    for token in [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]:
        torch.testing.assert_close(cached(window), full(window), rtol=1e-4, atol=1e-4)
        window = [*window, token][-16:]
    assert cached.cache.length == 16  # the window slid; the cache was rebuilt and refilled


def test_a_step_feeds_only_the_new_token():
    model = lively_model()
    decoder = CachedDecoder(model)
    decoder(list(range(10)))
    assert decoder.cache.length == 10
    decoder(list(range(11)))
    assert decoder.cache.length == 11
    decoder(list(range(1, 12)))  # a different window: rebuilt from scratch
    assert decoder.cache.length == 11


# ---------------------------------------------------------------------------- filtering

def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    values, ids = top_k_candidates(logits, 2)
    assert values.tolist() == [5.0, 4.0] and ids.tolist() == [1, 3]
    assert top_k_candidates(logits, 500)[1].tolist() == [1, 3, 2, 4, 0]  # clamps to V


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])  # sorted, largest first
    ids = torch.tensor([1, 2, 3, 0])
    kept = lambda p: top_p_candidates(probs.log(), ids, p)[1].tolist()  # noqa: E731
    assert kept(0.5) == [1]
    assert kept(0.6) == [1, 2]
    assert kept(0.85) == [1, 2, 3]
    assert kept(0.95) == [1, 2, 3, 0]
    assert kept(1.0) == [1, 2, 3, 0]
    assert kept(0.01) == [1]  # the top token always survives


def test_top_p_alone_samples_only_the_nucleus():
    logits = torch.tensor([0.1, 0.5, 0.25, 0.15]).log()
    gen = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, None, 0.6, gen) for _ in range(200)} == {1, 2}
    assert {sample_token(logits, 1.0, 3, 0.9, gen) for _ in range(200)} == {1, 2, 3}


def test_sampling_never_picks_a_filtered_or_padded_token():
    logits = torch.tensor([0.0, 3.0, 2.9, 1.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, 1.0, 2, 1.0, gen) for _ in range(200)}
    assert draws == {1, 2}
    assert sample_token(logits, 0.0, None, 1.0, gen) == 1  # temperature 0 is argmax
    model = lively_model(vocab_size=50)  # padded to 64 rows
    with torch.no_grad():
        model.lm_head.weight[50:] = 100.0 * model.lm_head.weight[0]  # padded rows would win
    tokens = generate_tokens(model, [1, 2], 30, temperature=2.0, top_k=None,
                             generator=torch.Generator().manual_seed(0))
    assert max(tokens) < 50


# ---------------------------------------------------------------------------- text

CHARS = CharTokenizer.from_text(string.printable)


def stream_text(tokenizer, ids, stop=()) -> list[str]:
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(i) for i in ids]
    return [*pieces, stream.finish()]


def test_stop_string_ends_the_text_before_it():
    ids = CHARS.encode("HELLO World. STOP here? no STOP")
    assert "".join(stream_text(CHARS, ids, stop=["STOP"])) == "HELLO World. "
    assert "".join(stream_text(CHARS, ids, stop=["no", "World"])) == "HELLO "  # earliest wins


def test_text_that_may_begin_a_stop_string_is_held_until_decided():
    pieces = stream_text(CHARS, CHARS.encode("ab\n\nc\n"), stop=["\n\n\n"])
    assert pieces == ["a", "b", "", "", "\n\nc", "", "\n"]  # held, released, held, flushed


def test_bpe_pieces_are_whole_utf8_characters():
    gpt2 = GPT2Tokenizer()
    text = "日本語のテキスト 🙂 naïve café"
    ids = gpt2.encode(text)
    pieces = stream_text(gpt2, ids)
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert "" in pieces[:-1]  # some tokens end mid-character and were held
    for piece in pieces:
        piece.encode("utf-8")  # every piece is valid text on its own


def test_generated_bpe_text_equals_the_decoded_tokens():
    model = lively_model(vocab_size=50257)
    gpt2 = GPT2Tokenizer()
    settings = dict(temperature=1.0, top_k=None)
    ids = list(generate_tokens(model, [gpt2.eot_id], 40, generator=torch.Generator()
                               .manual_seed(3), **settings))
    ids = ids[:ids.index(gpt2.eot_id)] if gpt2.eot_id in ids else ids
    text = "".join(generate(model, gpt2, "", 40, seed=3, **settings))
    assert text == gpt2.decode(ids)


def test_end_of_text_token_stops_a_gpt2_sample():
    model = lively_model(vocab_size=50257, bias=True)
    gpt2 = GPT2Tokenizer()
    with torch.no_grad():  # hidden state becomes a constant vector that points at <|endoftext|>
        ln_f = model.transformer.ln_f
        ln_f.weight.zero_()
        ln_f.bias.copy_(torch.randn(32))
        model.lm_head.weight[gpt2.eot_id] = 10.0 * ln_f.bias
    assert list(generate(model, gpt2, "Hello", 20, temperature=0)) == []


def test_stop_string_in_a_generated_sample(trained):
    model, tokenizer = trained
    full = "".join(generate(model, tokenizer, "\n", 120, seed=5))
    stop = full[40:42]
    cut = full.index(stop)
    assert "".join(generate(model, tokenizer, "\n", 120, seed=5, stop=[stop])) == full[:cut]


# ---------------------------------------------------------------------------- API settings

def test_seed_makes_generation_reproducible(trained):
    model, tokenizer = trained
    runs = ["".join(generate(model, tokenizer, "ROMEO:", 40, seed=s)) for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_float16_sampling_works_on_the_cpu(tiny_run, trained):
    model, tokenizer = load(tiny_run, device="cpu", dtype="float16")
    assert next(model.parameters()).dtype == torch.float16
    text = "".join(generate(model, tokenizer, "ROMEO:", 30, seed=1))
    assert len(text) == 30 and set(text) <= set(tokenizer.chars)
    x = torch.tensor([tokenizer.encode("ROMEO:")])
    with torch.no_grad():
        want = trained[0](x)[0].float().log_softmax(-1)
        got = model(x)[0].float().log_softmax(-1)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


@pytest.mark.parametrize("settings, fragment", [
    (dict(top_k=0), "top_k=0"), (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=-0.5), "temperature=-0.5"), (dict(stop=[""]), "stop"),
    (dict(prompt=""), "prompt is empty"), (dict(prompt="Olá ☃"), "'á' '☃'"),
])
def test_bad_generate_settings_raise_before_any_text(trained, settings, fragment):
    model, tokenizer = trained
    args = dict(prompt="ROMEO:", max_new_tokens=5) | settings
    with pytest.raises(ConfigError, match=fragment):
        generate(model, tokenizer, **args)


# ---------------------------------------------------------------------------- CLI

def test_cli_prints_only_the_samples_on_stdout(tiny_run, capsys):
    code, out, err = cli(capsys, str(tiny_run), "--start=ROMEO:", "--num_samples=2",
                         "--max_new_tokens=30", "--seed=7", "--device=cpu")
    assert code == 0
    model, tokenizer = load(tiny_run, device="cpu")
    gen = torch.Generator().manual_seed(7)
    expected = "".join("ROMEO:" + "".join(generate(model, tokenizer, "ROMEO:", 30, seed=gen))
                       + SEPARATOR for _ in range(2))
    assert out == expected
    first, second = out.split(SEPARATOR)[:2]
    assert first != second  # samples differ, yet the whole output is reproducible
    assert "cpu" in err and "seed 7" in err and "ROMEO" not in err


def test_cli_output_is_reproducible_and_streaming_does_not_change_it(tiny_run, capsys):
    args = (f"--out_dir={tiny_run}", "--num_samples=2", "--max_new_tokens=25", "--seed=3")
    outputs = [cli(capsys, *args, *extra)[1] for extra in ((), (), ("--no-stream",))]
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0] != cli(capsys, *args[:-1], "--seed=4")[1]


def test_cli_reads_the_prompt_from_a_file(tiny_run, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:\nO Romeo, Romeo!\n", "utf-8")
    code, out, _ = cli(capsys, str(tiny_run), f"--start=FILE:{prompt}", "--num_samples=1",
                       "--max_new_tokens=10")
    assert code == 0 and out.startswith("JULIET:\nO Romeo, Romeo!\n")


def test_cli_stop_string(tiny_run, capsys):
    args = (str(tiny_run), "--num_samples=1", "--max_new_tokens=60", "--seed=2", "--top_k=5")
    full = cli(capsys, *args)[1].removesuffix(SEPARATOR)
    stop = full[30:32]
    stopped = cli(capsys, *args, f"--stop={stop}")[1].removesuffix(SEPARATOR)
    assert stopped == full[:full.index(stop, 1)]


def incomplete_run(tiny_run: Path, tmp_path: Path, keep: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / keep, run / keep)
    return run


@pytest.mark.parametrize("argv, fragment", [
    (lambda run, tmp: [str(tmp / "missing")], "does not exist"),
    (lambda run, tmp: [str(incomplete_run(run, tmp, "run.json"))], "no model.safetensors"),
    (lambda run, tmp: [str(incomplete_run(run, tmp, "model.safetensors"))], "run.json"),
    (lambda run, tmp: [str(run), "--start=Hello ☃ ✓"], "'☃' '✓'"),
    (lambda run, tmp: [str(run), "--start="], "prompt is empty"),
    (lambda run, tmp: [str(run), "--top_k=0"], "top_k"),
    (lambda run, tmp: [str(run), "--top_p=0"], "top_p"),
    (lambda run, tmp: [str(run), "--top_p=1.01"], "top_p"),
    (lambda run, tmp: [str(run), "--temperature=-1"], "temperature"),
    (lambda run, tmp: [str(run), "--stop="], "stop"),
    (lambda run, tmp: [str(run), f"--start=FILE:{tmp / 'nope.txt'}"], "not found"),
    (lambda run, tmp: [str(run), "--device=cuda"], "available: cpu"),
])
def test_bad_input_is_one_line_without_a_traceback(tiny_run, tmp_path, capsys, argv,
                                                   fragment):
    if fragment == "available: cpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = cli(capsys, *argv(tiny_run, tmp_path), "--max_new_tokens=3",
                         "--num_samples=1")
    assert code == 2 and out == ""
    assert err.startswith("folio: error:") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err

