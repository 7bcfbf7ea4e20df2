"""Chat: conversations as data (the assistant mask, token by token), the chat template and its
Hugging Face form, vocabulary growth, --task=chat finetuning (masked loss, resume), `folio
chat` through a pipe, and the server's chat route with a run's template."""

from __future__ import annotations

import io
import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import devices

from folio.cli import main
from folio.config import ChatConfig, PrepareConfig
from folio.data import chat
from folio.data.chat_prepare import prepare_chat
from folio.data.loader import ChatLoader, open_split
from folio.data.tokenizer import (
    AddedTokens,
    CharTokenizer,
    GPT2Tokenizer,
    read_meta,
    special_ids,
    tokenizer_from_spec,
)
from folio.model.gpt import GPT, GPTConfig

WORDS = "zero one two three four five six seven eight".split()
CHAT_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=48", "--batch_size=8",
             "--device=cpu", "--compile=False", "--dtype=float32", "--eval_iters=4",
             "--log_interval=50", "--warmup_iters=5", "--learning_rate=3e-3", "--min_lr=3e-4",
             "--always_save_checkpoint=False", "--recipe=nanogpt"]


def conversation(a: int, b: int, system: bool = False) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": f"{a}+{b}?"},
             {"role": "assistant", "content": WORDS[a + b]}]
    return ([{"role": "system", "content": "sum"}] if system else []) + turns


def write_conversations(path: Path, n: int = 120, bad: bool = False) -> Path:
    rng = random.Random(0)
    lines = [json.dumps({"messages": conversation(rng.randrange(5), rng.randrange(5),
                                                  system=i % 4 == 0)}) for i in range(n)]
    if bad:
        lines[3] = "{not json"
        lines[5] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
        lines[7] = json.dumps({"messages": [{"role": "robot", "content": "hi"}]})
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


def request(url: str, method: str, path: str, body: bytes) -> tuple[int, dict]:
    """One raw HTTP request to the server at `url`: the status and the JSON body."""
    import http.client
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


# ---------------------------------------------------------------------------- the template

def test_mask_marks_the_assistant_content_and_its_end_token_only():
    tok = chat.chat_tokenizer(CharTokenizer(sorted(set("abcxyz?"))))
    messages = [{"role": "system", "content": "ab"}, {"role": "user", "content": "c?"},
                {"role": "assistant", "content": "xy"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "z"}]
    ids, mask = chat.encode(tok, messages)
    names = {i: t for t, i in special_ids(tok).items()}
    rendered = [names.get(i, tok.decode([i])) for i in ids]
    assert rendered == ["<|endoftext|>", "<|system|>", "a", "b", "<|end|>", "<|user|>", "c",
                        "?", "<|end|>", "<|assistant|>", "x", "y", "<|end|>", "<|user|>", "a",
                        "<|end|>", "<|assistant|>", "z", "<|end|>"]
    assert mask == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert "".join(rendered) == chat.render_text(messages)


def test_special_tokens_are_added_after_a_vocabulary_without_them():
    char = chat.chat_tokenizer(CharTokenizer(list("ab")))
    assert isinstance(char, AddedTokens) and char.vocab_size == 2 + 5
    assert special_ids(char)["<|end|>"] == 6 and char.eot_id == 2
    assert char.decode([0, 6, 1]) == "a<|end|>b"
    assert tokenizer_from_spec(char.spec()).spec() == char.spec()  # run.json round trip
    gpt2 = chat.chat_tokenizer(GPT2Tokenizer())
    ids = special_ids(gpt2)
    assert ids["<|endoftext|>"] == 50256  # GPT-2's own, then the four it lacks
    assert [ids[t] for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")] == \
        [50257, 50258, 50259, 50260]
    assert gpt2.vocab_size == 50261 and list(gpt2.token_bytes()[-4:]) == [0, 0, 0, 0]


@pytest.mark.parametrize("base", ["char", "gpt2"])
def test_template_renders_as_transformers_apply_chat_template(tmp_path, base):
    from transformers import AutoTokenizer

    from folio.store.hf_tokenizer import write_tokenizer
    plain = CharTokenizer(sorted(set("abc? +0123456789sumhiy"))) if base == "char" \
        else GPT2Tokenizer()
    tok = chat.chat_tokenizer(plain)
    write_tokenizer(tmp_path, tok, 64, chat.JINJA)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text("utf-8"))
    assert config["chat_template"] == chat.JINJA
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "sum"}, {"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": "hi 3"}, {"role": "user", "content": "ab c"}]
    for prompt in (False, True):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert text == chat.render_text(messages, prompt)
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == chat.encode(tok, messages, prompt)[0]


def test_bad_conversations_are_named_one_line_errors():
    with pytest.raises(chat.ChatError, match="no assistant turn"):
        chat.check_messages([{"role": "user", "content": "hi"}], need_assistant=True)
    with pytest.raises(chat.ChatError, match="role 'bot'"):
        chat.check_messages([{"role": "bot", "content": "hi"}])
    with pytest.raises(chat.ChatError, match="content is not a string"):
        chat.check_messages([{"role": "user", "content": 3}])
    with pytest.raises(chat.ChatError, match="upgrade folio"):
        chat.check_record({"name": "other-template"}, "run.json")


# ---------------------------------------------------------------------------- the model

@pytest.mark.parametrize("tie_head", [True, False])
@pytest.mark.parametrize("old,new", [(30, 35), (60, 70)])  # same padded size; a larger one
def test_growing_the_vocabulary_keeps_old_rows(old, new, tie_head):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=old, block_size=8, n_layer=1, n_head=2, n_embd=8,
                          tie_head=tie_head))
    wte = model.transformer.wte.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    x = torch.randint(old, (1, 8))
    before = model(x)
    model.grow_vocab(new)
    grown = model.transformer.wte.weight
    assert model.config.vocab_size == new and grown.size(0) == model.config.padded_vocab_size
    assert torch.equal(grown[:old], wte[:old])
    assert torch.allclose(grown[old:new], wte[:old].mean(0).expand(new - old, -1))
    assert torch.equal(model.lm_head.weight[:old], head[:old])
    assert (model.lm_head.weight is grown) == tie_head
    after = model(x)  # old tokens' logits unchanged; the new ones added at the end
    assert after.shape == (1, new) and torch.allclose(after[:, :old], before, atol=1e-6)
    assert torch.isfinite(model(x, torch.full((1, 8), new - 1))).all()


# ---------------------------------------------------------------------------- prepare, loader

@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    """Conversations prepared with a char vocabulary (added tokens), three of them bad."""
    tmp = tmp_path_factory.mktemp("chatdata")
    conv = write_conversations(tmp / "sums.jsonl", bad=True)
    prepare_chat(PrepareConfig(dataset=str(conv), format="chat", data_dir=str(tmp / "data")))
    return tmp / "data"


def test_prepare_writes_tokens_and_masks_and_counts_bad_lines(chat_data):
    meta = read_meta(chat_data / "sums")
    assert meta["format"] == "chat" and meta["skipped"] == 3
    assert meta["train_conversations"] + meta["val_conversations"] == 117
    assert meta["val_conversations"] == 12
    assert [p.split(":")[0] for p in meta["problems"]] == ["line 4", "line 6", "line 8"]
    tok = tokenizer_from_spec(meta["tokenizer"])
    ids = np.fromfile(chat_data / "sums" / "train.bin", dtype=meta["dtype"])
    mask = np.fromfile(chat_data / "sums" / "train_mask.bin", dtype=np.uint8)
    assert len(ids) == len(mask) == meta["train_tokens"]
    end = special_ids(tok)["<|end|>"]
    # every assistant span is a word followed by <|end|>; nothing else is marked
    spans = "".join(map(str, mask)).replace("0", " ").split()
    words = tok.decode([int(i) for i, m in zip(ids, mask, strict=True) if m]).split("<|end|>")
    assert len(spans) == meta["train_conversations"] and set(words[:-1]) <= set(WORDS)
    assert all(ids[i] == end for i in np.flatnonzero(mask[:-1] > mask[1:]))


def test_chat_batches_score_only_the_assistant_targets(chat_data):
    meta = read_meta(chat_data / "sums")
    split = open_split(chat_data / "sums", "train", meta)
    loader = ChatLoader(split, 4, 24, seed=0, device=torch.device("cpu"))
    for _ in range(5):  # windows start at a conversation
        assert np.isin(loader.starts(), split.conversations).all()
    for _ in range(5):
        state = loader.generator.get_state()
        starts = loader.starts()
        loader.generator.set_state(state)
        x, y = loader.next_batch()
        for row, start in enumerate(starts):
            window = np.asarray(split.tokens[start:start + 25], dtype=np.int64)
            assert x[row].tolist() == window[:-1].tolist()
            marked = split.mask[start + 1:start + 25] == 1
            assert (y[row] != -1).tolist() == marked.tolist()  # token by token
            assert y[row][marked].tolist() == window[1:][marked].tolist()
        assert (y != -1).any()


def test_prepare_with_no_usable_line_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\nnope\n', "utf-8")
    code = main(["prepare", str(bad), "--format=chat", f"--data_dir={tmp_path / 'data'}"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "no usable conversation" in err and "line 1" in err
    assert not (tmp_path / "data" / "bad").exists()


def test_chat_task_and_dataset_format_must_agree(chat_data, char_data_dir, tmp_path, capsys):
    assert main(["train", *CHAT_TINY, f"--data_dir={chat_data}", "--dataset=sums",
                 f"--out_dir={tmp_path / 'a'}", "--max_iters=1"]) != 0
    assert "--task=chat" in capsys.readouterr().err
    assert main(["train", *CHAT_TINY, f"--data_dir={char_data_dir}",
                 "--dataset=shakespeare_char", "--task=chat", f"--out_dir={tmp_path / 'b'}",
                 "--max_iters=1"]) != 0
    assert "needs conversations" in capsys.readouterr().err


# ---------------------------------------------------------------------------- training, chat

def train_chat(data_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", *CHAT_TINY, f"--data_dir={data_dir}", "--dataset=sums",
                 "--task=chat", f"--out_dir={out}", *extra])


@pytest.mark.parametrize("device", devices())
def test_chat_finetune_trains_with_muon_and_plots(chat_data, tmp_path, device):
    # the modern recipe (Muon) and the loss plot on a chat task: the masked val loss falls
    # and the plot is drawn from its metrics (a --time budget on a chat task: chat_sft.py);
    # on a GPU too where this machine has one (bfloat16, its attention kernels' mask)
    out = tmp_path / "modern"
    settings = [a for a in CHAT_TINY if not a.startswith(("--recipe", "--learning_rate",
                                                          "--min_lr", "--warmup", "--device",
                                                          "--dtype"))]
    settings += [f"--device={device}", "--dtype=float32" if device == "cpu" else "--dtype=bfloat16"]
    assert main(["train", *settings, f"--data_dir={chat_data}", "--dataset=sums",
                 "--task=chat", f"--out_dir={out}", "--recipe=modern", "--max_iters=60",
                 "--eval_interval=20"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["optimizer"] == "muon" and info["config"]["task"] == "chat"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0] - 0.5, val
    assert main(["plot", str(out), f"--output={tmp_path / 'loss.png'}"]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_chat_run(chat_data, tmp_path_factory) -> Path:
    """A chat run trained from scratch for a few iterations: it has the template."""
    out = tmp_path_factory.mktemp("chatruns") / "quick"
    assert train_chat(chat_data, out, "--max_iters=4", "--eval_interval=4") == 0
    return out


def test_chat_run_records_template_and_added_tokens(quick_chat_run):
    info = json.loads((quick_chat_run / "run.json").read_text("utf-8"))
    assert info["chat_template"]["name"] == chat.NAME
    assert info["tokenizer"]["added"] == list(chat.SPECIAL_TOKENS)
    assert info["config"]["task"] == "chat"


def test_folio_chat_through_a_pipe(quick_chat_run):
    from folio.infer.chat import run
    stdin = io.StringIO("1+1?\n/system sum\n2+2?\n/reset\n3+1?\n")
    stdout = io.StringIO()
    run(ChatConfig(run_dir=str(quick_chat_run), max_new_tokens=6, temperature=0.0,
                   device="cpu"), stdin=stdin, stdout=stdout)
    replies = stdout.getvalue().split("\n")
    assert len(replies) == 4 and replies[-1] == ""  # one line per question
    assert not any("<|end|>" in r for r in replies)  # a reply ends before its end token


def test_folio_chat_refuses_a_base_model(tiny_run, capsys):
    assert main(["chat", str(tiny_run), "--device=cpu"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no chat template" in err


def test_a_chat_run_keeps_conversations_apart_on_the_fast_path(chat_data, tmp_path, monkeypatch):
    # every forward pass of a chat run, the steps' and the evaluation's, derives the packed
    # conversations' mask, and the CPU's tiled dropout attention computes under it
    from folio.model import gpt
    from folio.speed import kernels
    packed, tiled = [], []

    def documents(idx, start):
        packed.append((torch.is_grad_enabled(), bool((idx[:, 0] == start).all())))
        return gpt_documents(idx, start)

    def causal_attention(q, k, v, p, mask=None):
        tiled.append(mask is not None)
        return tiled_attention(q, k, v, p, mask)
    gpt_documents, tiled_attention = gpt.documents, kernels.causal_attention
    monkeypatch.setattr(gpt, "documents", documents)
    monkeypatch.setattr(kernels, "causal_attention", causal_attention)
    assert train_chat(chat_data, tmp_path / "run", "--max_iters=2", "--eval_interval=2",
                      "--dropout=0.1") == 0
    assert {grad for grad, _ in packed} == {True, False}  # training and evaluation
    assert all(first for _, first in packed)  # each window starts at a conversation
    assert tiled and all(tiled)


@pytest.mark.slow
def test_resume_with_chat_task_matches_an_uninterrupted_run(chat_data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--eval_interval=3", "--lr_decay_iters=6"]
    assert train_chat(chat_data, straight, "--max_iters=6", *common) == 0
    assert train_chat(chat_data, split, "--max_iters=3", *common) == 0
    assert train_chat(chat_data, split, "--max_iters=6", "--init_from=resume", *common) == 0
    from safetensors.torch import load_file
    a, b = (load_file(d / "resume.safetensors") for d in (straight, split))
    weights = [k for k in a if k.startswith("model.")]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)
    assert json.loads((split / "run.json").read_text("utf-8"))["chat_template"] is not None


@pytest.fixture(scope="module")
def sft_run(chat_data, tmp_path_factory) -> Path:
    """A base char run (language modelling on the conversations' text), then finetuned on
    the conversations with --task=chat from it (its vocabulary grown by the chat tokens)."""
    tmp = tmp_path_factory.mktemp("sft")
    rng = random.Random(1)
    text = "\n".join(f"{a}+{b}? {WORDS[a + b]} sum" for a, b in
                     ((rng.randrange(5), rng.randrange(5)) for _ in range(400)))
    (tmp / "base.txt").write_text(text, "utf-8")
    assert main(["prepare", str(tmp / "base.txt"), f"--data_dir={tmp / 'data'}"]) == 0
    base = tmp / "base"
    assert main(["train", *CHAT_TINY, f"--data_dir={tmp / 'data'}", "--dataset=base",
                 f"--out_dir={base}", "--max_iters=40", "--eval_interval=40", "--n_layer=2",
                 "--n_embd=64"]) == 0
    conv = write_conversations(tmp / "sums.jsonl", n=300)
    assert main(["prepare", str(conv), "--format=chat", f"--tokenizer={base}",
                 f"--data_dir={tmp / 'data'}"]) == 0
    out = tmp / "sft"
    assert main(["train", *CHAT_TINY, f"--data_dir={tmp / 'data'}", "--dataset=sums",
                 "--task=chat", f"--init_from={base}", f"--out_dir={out}", "--max_iters=400",
                 "--eval_interval=50", "--learning_rate=1e-2", "--batch_size=16"]) == 0
    return out


@pytest.mark.slow
def test_sft_lowers_the_masked_val_loss_and_learns_the_answers(sft_run):
    rows = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in rows if r["kind"] == "eval"]
    assert evals[-1] < 0.5 * evals[0]
    import folio
    from folio.infer.chat import reply
    model, tok = folio.load(sft_run, device="cpu")
    questions = [(a, b) for a in range(5) for b in range(5)]
    right = sum(reply(model, tok, conversation(a, b)[:1], max_new_tokens=8) == WORDS[a + b]
                for a, b in questions)
    assert right >= 0.8 * len(questions), right
    print(f"exact match on the sums: {right}/{len(questions)}")


@pytest.mark.slow
def test_server_chat_uses_the_template_and_stops_at_end_of_turn(sft_run, tiny_run):
    import folio
    from folio.config import ServeConfig
    from folio.infer.chat import reply
    from folio.infer.serve.app import background
    body = {"model": "sft", "messages": [{"role": "user", "content": "2+2?"}],
            "max_tokens": 20, "temperature": 0}
    model, tok = folio.load(sft_run, device="cpu")
    expected = reply(model, tok, body["messages"], max_new_tokens=20)
    with background(ServeConfig(run_dirs=[str(sft_run), str(tiny_run)], port=0)) as url:
        status, answer = request(url, "POST", "/v1/chat/completions", json.dumps(body).encode())
        assert status == 200, answer
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == expected
        assert expected in WORDS
        # a base model keeps the script format; characters the vocabulary lacks are a 400
        base = {**body, "model": "tiny", "messages": [{"role": "user", "content": "Hi!"}]}
        status, answer = request(url, "POST", "/v1/chat/completions", json.dumps(base).encode())
        assert status == 200 and "\n\n" not in answer["choices"][0]["message"]["content"]
        status, answer = request(url, "POST", "/v1/chat/completions", json.dumps(
            {**body, "messages": [{"role": "user", "content": "\u00e9\u00e9"}]}).encode())
        assert status == 400 and answer["error"]["code"] == "bad_prompt"
    with background(ServeConfig(run_dirs=[str(tiny_run)], port=0, strict_template=True)) as url:
        status, answer = request(url, "POST", "/v1/chat/completions", json.dumps(base).encode())
        assert status == 400 and answer["error"]["code"] == "no_chat_template"


def test_api_answers_4xx_for_bad_chat_bodies():
    from folio.infer.serve import api
    from folio.infer.serve.api import ApiError
    from folio.store.rundir import RunInfo
    with pytest.raises(ApiError) as deep:
        api.parse_json(b"[" * 100_000 + b"]" * 100_000)
    assert deep.value.status == 400
    limits = api.Limits(64, 1000, 2)
    for messages in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": 5}]):
        with pytest.raises(ApiError) as bad:
            api.parse_request({"model": "m", "messages": messages}, True, limits)
        assert bad.value.status == 400
    tok = chat.chat_tokenizer(CharTokenizer(sorted(set(string.ascii_letters + ":\n "))))
    req = api.parse_request({"model": "m", "messages": [
        {"role": "developer", "content": "a"}, {"role": "user", "content": "bc"}]}, True, limits)
    with_template = RunInfo(model={}, tokenizer=tok.spec(), chat_template=chat.record())
    ids, stop = api.chat_prompt(req, tok, with_template, strict=True)
    assert ids == chat.prompt_ids(tok, [{"role": "system", "content": "a"},
                                        {"role": "user", "content": "bc"}])
    assert stop == ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    base = RunInfo(model={}, tokenizer=tok.spec())
    assert api.chat_prompt(req, tok, base, strict=False)[1] == ["\n\n"]
    for info, strict, code in ((base, True, "no_chat_template"),
                               (RunInfo(model={}, tokenizer={}, chat_template={"name": "x"}),
                                False, "unknown_chat_template")):
        with pytest.raises(ApiError) as refused:
            api.chat_prompt(req, tok, info, strict)
        assert (refused.value.status, refused.value.code) == (400, code)
    unknown = api.parse_request({"model": "m", "messages": [{"role": "user", "content": "\u00e9"}]},
                                True, limits)
    with pytest.raises(ApiError) as bad_chars:
        api.chat_prompt(unknown, tok, with_template, strict=False)
    assert (bad_chars.value.status, bad_chars.value.code) == (400, "bad_prompt")


@pytest.mark.slow
def test_prepare_reads_conversations_from_a_hub_dataset(tmp_path):
    """hf:DIR (a local datasets dir of .jsonl files) with a messages column."""
    folder = tmp_path / "convs"
    folder.mkdir()
    write_conversations(folder / "part.jsonl", n=40)
    out = prepare_chat(PrepareConfig(dataset=f"hf:{folder}", format="chat",
                                     data_dir=str(tmp_path / "data"), tokenizer="gpt2"))
    meta = read_meta(out)
    assert meta["train_conversations"] + meta["val_conversations"] == 40
    assert meta["tokenizer"] == {"kind": "gpt2", "added": ["<|system|>", "<|user|>",
                                                           "<|assistant|>", "<|end|>"]}
    assert meta["val_assistant_tokens"] > 0


@pytest.mark.slow  # two processes under torchrun
def test_chat_finetune_under_torchrun_trains_and_resumes(chat_data, tmp_path):
    import os
    import subprocess
    import sys
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node=2", "-m", "folio", "train", *CHAT_TINY,
              f"--data_dir={chat_data}", "--dataset=sums", "--task=chat", f"--out_dir={out}",
              "--gradient_accumulation_steps=2", "--eval_interval=3", "--lr_decay_iters=6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--max_iters=3"], ["--max_iters=6", "--init_from=resume"]):
        done = subprocess.run([*launch, *extra], capture_output=True, text=True, timeout=300,
                              env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.loads((out / "run.json").read_text("utf-8"))
    assert info["iter_num"] == 6 and info["world_size"] == 2
    assert info["chat_template"]["name"] == chat.NAME


def test_export_of_a_chat_run_carries_its_template(quick_chat_run, tmp_path, capsys):
    from transformers import AutoTokenizer
    assert main(["export", str(quick_chat_run), str(tmp_path / "hf")]) == 0
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    import folio
    _, tok = folio.load(quick_chat_run, device="cpu")
    messages = conversation(2, 3, system=True)
    ids = hf.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == chat.encode(tok, messages)[0]
    assert main(["export", str(quick_chat_run), str(tmp_path / "m.gguf"), "--format=gguf"]) != 0
    assert "--format hf" in capsys.readouterr().err


@pytest.mark.slow  # an export, a prepare and a finetune
def test_chat_finetune_from_a_hugging_face_dir(tiny_run, tmp_path):
    """A char run exported to Hugging Face, then --init_from=HF_DIR --task=chat: the dataset
    takes the exported vocabulary (folio_vocab.json) and the model grows by the chat tokens."""
    hf_dir = tmp_path / "hf"
    assert main(["export", str(tiny_run), str(hf_dir)]) == 0
    lines = [json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                      {"role": "assistant", "content": w}]})
             for w in ("one", "two", "three", "four", "five") * 4]
    (tmp_path / "say.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    assert main(["prepare", str(tmp_path / "say.jsonl"), "--format=chat",
                 f"--tokenizer={hf_dir}", f"--data_dir={tmp_path / 'data'}"]) == 0
    out = tmp_path / "chat"
    assert main(["train", *CHAT_TINY, f"--data_dir={tmp_path / 'data'}", "--dataset=say",
                 "--task=chat", f"--init_from={hf_dir}", f"--out_dir={out}", "--max_iters=2",
                 "--eval_interval=2", "--block_size=32"]) == 0
    info = json.loads((out / "run.json").read_text("utf-8"))
    assert info["model"]["vocab_size"] == 65 + 5 and info["chat_template"] is not None


# ---------------------------------------------------------------------------- a skill, held out

def skill_split(tmp: Path) -> tuple[Path, list[dict]]:
    """scripts/chat_skill.py's persona set: its train file and held-out prompts."""
    import runpy
    skill = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" /
                               "chat_skill.py"))
    train, held_out = skill["write"](tmp / "skill")
    return train, [json.loads(line) for line in held_out.read_text().splitlines()]


def user_and_assistant_loss(model: GPT, tok, messages: list[dict]) -> tuple[float, float]:
    """The model's mean loss on the user's content tokens and on the assistant's."""
    ids, mask = chat.encode(tok, messages)
    specials = set(special_ids(tok).values())
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logits = torch.cat([model(x[:, :t + 1])[0][None] for t in range(x.size(1))])
    losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    user = [i for i in range(len(ids) - 1) if not mask[i + 1] and ids[i + 1] not in specials]
    assistant = [i for i in range(len(ids) - 1) if mask[i + 1]]
    return losses[user].mean().item(), losses[assistant].mean().item()


@pytest.mark.slow
def test_sft_answers_held_out_questions_and_learns_only_the_assistant(tmp_path):
    # a chat model trained from scratch on the persona set: held-out phrasings answered
    # exactly, and the loss only on the assistant's tokens: the questions are as predictable
    # as the answers (templates), yet the model must not have learnt them. Checked with the
    # loss mask off (every target kept): exact match alone does not tell (140/200 new
    # pairings against 128/200 with it), the user's loss does (0.22-0.32 on five held-out
    # rows against 7.9-9.3 with it; the answer's 0.02-0.07 either way), so that assertion is
    # the one a mask that is off fails
    train, held_out = skill_split(tmp_path)
    assert main(["prepare", str(train), "--format=chat", f"--data_dir={tmp_path / 'data'}",
                 "--name=persona"]) == 0
    out = tmp_path / "persona"
    assert main(["train", *CHAT_TINY, f"--data_dir={tmp_path / 'data'}", "--dataset=persona",
                 "--task=chat", f"--out_dir={out}", "--max_iters=300", "--eval_interval=300",
                 "--n_layer=2", "--n_embd=64", "--block_size=128", "--batch_size=16",
                 "--learning_rate=1e-2"]) == 0
    import folio
    from folio.infer.chat import reply
    model, tok = folio.load(out, device="cpu")
    # new pairings of known questions (the other kinds hold letters a vocabulary of the
    # training conversations alone lacks: "Good sir, ")
    seen_questions = [row for row in held_out if row["kind"] == "pairing"]
    right = sum(reply(model, tok, row["messages"], max_new_tokens=40) == row["answer"]
                for row in seen_questions)
    assert right >= 0.5 * len(seen_questions), f"{right}/{len(seen_questions)}"  # before: 0
    row = seen_questions[0]
    user, assistant = user_and_assistant_loss(
        model, tok, row["messages"] + [{"role": "assistant", "content": row["answer"]}])
    assert assistant < 0.1 and user > 1.0, (user, assistant)
