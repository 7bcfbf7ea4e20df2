"""`folio serve`: the OpenAI-compatible API through the real `openai` client and raw HTTP, over a
real uvicorn server on 127.0.0.1; concurrency, the queue bound, disconnects; run discovery."""

from __future__ import annotations

import asyncio
import fcntl
import http.client
import json
import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
from conftest import copy_run

from folio.cli import main
from folio.cli.args import parse_args
from folio.config import ServeConfig
from folio.infer.serve import api
from folio.infer.serve.app import ChunkWriter, background, exposure_warning, in_own_thread
from folio.infer.serve.engine import Engine
from folio.infer.serve.runs import ModelPool

MANY = 10**6  # max_tokens for generations that only a cancel ends within a test's time


@pytest.fixture(scope="module")
def url(tiny_run):
    with background(ServeConfig(run_dirs=[str(tiny_run)], port=0, max_tokens=64,
                                max_prompt_chars=500)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    """One raw HTTP request; the status and the JSON body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def open_stream(url: str, max_tokens: int = MANY) -> http.client.HTTPConnection:
    """A streamed completion whose first chunk has arrived; close the connection to leave."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = json.dumps({"model": "tiny", "prompt": "ROMEO:", "max_tokens": max_tokens,
                       "stream": True})
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    conn.first_line = response.readline()  # blocks until the first chunk
    return conn


def status(url: str) -> dict:
    return request(url, "GET", "/api/status")[1]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------- openai client

def test_models_lists_one_model_per_run(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_through_the_openai_client(client):
    answer = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12,
                                       temperature=0)
    again = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12,
                                      temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert choice.text == again.choices[0].text  # greedy is deterministic
    assert answer.usage.prompt_tokens == len("ROMEO:")
    assert answer.usage.completion_tokens == 12


def test_seed_makes_samples_reproducible_and_n_gives_several(client):
    kwargs = dict(model="tiny", prompt="\n", max_tokens=16, temperature=1.0, seed=7, n=2)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert first.usage.completion_tokens == 32


def test_chat_through_the_openai_client(client):
    answer = client.chat.completions.create(
        model="tiny", max_tokens=10, temperature=0,
        messages=[{"role": "system", "content": "A play."},
                  {"role": "user", "content": "Speak."}])
    message = answer.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    # turns are joined as "NAME:\ncontent\n\n" ... "ASSISTANT:\n" (see api.join_chat)
    assert answer.usage.prompt_tokens == len("SYSTEM:\nA play.\n\nUSER:\nSpeak.\n\nASSISTANT:\n")


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model="tiny", prompt="KING:", max_tokens=20,
                                      temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="KING:", max_tokens=20,
                                            temperature=0, stream=True))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streamed_chat_names_the_role_and_reports_usage(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        temperature=0, stop=["zzz"], stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_a_streamed_pieces_frame_is_the_whole_chunks_json(chat):
    # text frames are rendered once around a placeholder: the bytes must be the chunk's own
    body = {"model": 'a "run"', "n": 2, **({"messages": [{"role": "user", "content": "x"}]}
                                         if chat else {"prompt": "x"})}
    req = api.parse_request(body, chat, api.Limits(16, 100, 2))
    writer = ChunkWriter(req, 1)
    for piece in ["a", '"\\\n', "é", "\u2028😀", "\x00", "", "</script>"]:
        for index in (0, 1):
            want = api.sse(api.chunk(req, writer.id, writer.created, index, piece))
            assert writer.text(index, piece) == want, piece


def test_stop_string_ends_the_answer(client):
    whole = client.completions.create(model="tiny", prompt="\n", max_tokens=40,
                                      temperature=0).choices[0].text
    stop = whole[5:7]
    cut = client.completions.create(model="tiny", prompt="\n", max_tokens=40, temperature=0,
                                    stop=[stop]).choices[0]
    assert cut.text == whole[:whole.find(stop)] and cut.finish_reason == "stop"


def test_errors_come_back_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       temperature=-1)


def test_api_key_is_required_on_every_api_route(tiny_run):
    cfg = ServeConfig(run_dirs=[str(tiny_run)], port=0, api_key="s3cret")
    with background(cfg) as base:
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        for path in ("/v1/models", "/api/runs", "/api/status", "/api/runs/tiny/metrics",
                     "/api/runs/tiny/report", "/api/report?run=tiny"):
            assert request(base, "GET", path)[0] == 401
        assert request(base, "GET", "/api/runs",
                       headers={"Authorization": "Bearer s3cret"})[0] == 200
        parts = urlsplit(base)
        page = http.client.HTTPConnection(parts.hostname, parts.port)
        page.request("GET", "/")
        assert page.getresponse().status == 200  # the page itself asks for the key


# ---------------------------------------------------------------------------- raw HTTP

def post(body) -> tuple[str, str, bytes]:
    return ("POST", "/v1/completions", body if isinstance(body, bytes) else
            json.dumps(body).encode())


def chat(body) -> tuple[str, str, bytes]:
    return ("POST", "/v1/chat/completions", json.dumps(body).encode())


OK = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2}
MSG = [{"role": "user", "content": "Hi"}]
BAD_INPUT = {
    "bad JSON": (post(b'{"model": "tiny",'), 400, None),
    "body is a list": (post(b"[1, 2]"), 400, None),
    "body is not UTF-8": (post(b"\xff\xfe{}"), 400, None),
    "empty body": (post(b""), 400, None),
    "model missing": (post({"prompt": "x"}), 400, "model"),
    "model not a string": (post({**OK, "model": 3}), 400, "model"),
    "unknown model": (post({**OK, "model": "gpt-4"}), 404, "model"),
    "path traversal in model": (post({**OK, "model": "../tiny"}), 404, "model"),
    "absolute path as model": (post({**OK, "model": "/etc/passwd"}), 404, "model"),
    "run dir path as model": (post({**OK, "model": "tiny/../../tiny"}), 404, "model"),
    "prompt missing": (post({"model": "tiny"}), 400, "prompt"),
    "prompt not a string": (post({**OK, "prompt": 42}), 400, "prompt"),
    "prompt of two strings": (post({**OK, "prompt": ["a", "b"]}), 400, "prompt"),
    "prompt too long": (post({**OK, "prompt": "a" * 501}), 400, "prompt"),
    "prompt outside the vocabulary": (post({**OK, "prompt": "日本"}), 400, "prompt"),
    "negative max_tokens": (post({**OK, "max_tokens": -5}), 400, "max_tokens"),
    "zero max_tokens": (post({**OK, "max_tokens": 0}), 400, "max_tokens"),
    "huge max_tokens": (post({**OK, "max_tokens": 10**12}), 400, "max_tokens"),
    "max_tokens a string": (post({**OK, "max_tokens": "10"}), 400, "max_tokens"),
    "max_tokens a boolean": (post({**OK, "max_tokens": True}), 400, "max_tokens"),
    "max_tokens a fraction": (post({**OK, "max_tokens": 1.5}), 400, "max_tokens"),
    "negative temperature": (post({**OK, "temperature": -0.1}), 400, "temperature"),
    "temperature a string": (post({**OK, "temperature": "hot"}), 400, "temperature"),
    "temperature NaN-like huge": (post({**OK, "temperature": 1e309}), 400, "temperature"),
    "top_p zero": (post({**OK, "top_p": 0}), 400, "top_p"),
    "top_p above one": (post({**OK, "top_p": 1.5}), 400, "top_p"),
    "top_k zero": (post({**OK, "top_k": 0}), 400, "top_k"),
    "n zero": (post({**OK, "n": 0}), 400, "n"),
    "n too large": (post({**OK, "n": 100}), 400, "n"),
    "too many stop strings": (post({**OK, "stop": list("abcde")}), 400, "stop"),
    "empty stop string": (post({**OK, "stop": ""}), 400, "stop"),
    "stop a number": (post({**OK, "stop": 5}), 400, "stop"),
    "stream not a boolean": (post({**OK, "stream": "yes"}), 400, "stream"),
    "stream_options without stream": (post({**OK, "stream_options": {"include_usage": True}}),
                                      400, "stream_options"),
    "seed a string": (post({**OK, "seed": "x"}), 400, "seed"),
    "unknown field": (post({**OK, "temprature": 0.5}), 400, "temprature"),
    "messages missing": (chat({"model": "tiny"}), 400, "messages"),
    "messages empty": (chat({"model": "tiny", "messages": []}), 400, "messages"),
    "message without role": (chat({"model": "tiny", "messages": [{"content": "x"}]}), 400,
                             "messages[0].role"),
    "message with unknown role": (chat({"model": "tiny", "messages": [
        {"role": "wizard", "content": "x"}]}), 400, "messages[0].role"),
    "message content a number": (chat({"model": "tiny", "messages": [
        {"role": "user", "content": 1}]}), 400, "messages[0].content"),
    "prompt field on chat": (chat({"model": "tiny", "messages": MSG, "prompt": "x"}), 400,
                             "prompt"),
    "oversized body": (post({**OK, "prompt": "a" * (2 << 20)}), 413, None),
    "GET on a POST route": (("GET", "/v1/completions", None), 405, None),
    "unknown route": (("GET", "/v1/engines", None), 404, None),
    "unknown model card": (("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", None), 404, None),
    "metrics of no run": (("GET", "/api/runs/..%2F..%2Fetc/metrics", None), 404, None),
    "static file traversal": (("GET", "/static/..%2F..%2F..%2Frun.json", None), 404, None),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_an_openai_style_4xx_error(url, case):
    (method, path, body), expected, param = BAD_INPUT[case]
    got, answer = request(url, method, path, body)
    assert got == expected, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
    if param is not None:
        assert answer["error"]["param"] == param


def test_the_server_still_answers_after_bad_input(url, client):
    for (method, path, body), _, _ in BAD_INPUT.values():
        request(url, method, path, body)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=3).choices[0].text


# ---------------------------------------------------------------------------- many users

def test_eight_concurrent_streams_all_finish(url, client):
    results: dict[int, tuple[str, str, int]] = {}

    def one(i: int) -> None:
        chunks = list(client.completions.create(
            model="tiny", prompt="ROMEO:", max_tokens=24, temperature=1.0, seed=i, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        results[i] = (text, reason, chunks[-1].usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(8))
    assert all(reason == "length" and used == 24 for _, reason, used in results.values())
    assert len({text for text, _, _ in results.values()}) > 1  # different seeds
    wait_for(lambda: status(url)["active"] == 0)


def test_a_disconnect_mid_stream_frees_its_slot(tiny_run):
    cfg = ServeConfig(run_dirs=[str(tiny_run)], port=0, max_active=1, queue_size=0,
                      max_tokens=MANY)
    with background(cfg) as base:
        stream = open_stream(base)
        assert stream.first_line.startswith(b"data: ")
        assert status(base)["active"] == 1
        assert request(base, "POST", *post(OK)[1:])[0] == 429  # the one slot is taken
        stream.close()  # a million tokens would take minutes: only the cancel frees the slot
        wait_for(lambda: status(base)["active"] == 0, timeout=10)
        assert request(base, "POST", *post(OK)[1:])[0] == 200


def test_a_model_loads_in_a_thread_that_ends_with_it(tiny_run, monkeypatch):
    # regression: loads ran in asyncio's thread pool, whose threads outlive them with their
    # OpenMP teams, and beside those the decoding thread's steps ran slower (see in_own_thread)
    loaders: list[threading.Thread] = []
    get = ModelPool.get
    monkeypatch.setattr(ModelPool, "get", lambda pool, name: (
        loaders.append(threading.current_thread()), get(pool, name))[1])
    with background(ServeConfig(run_dirs=[str(tiny_run)], port=0)) as base:
        assert request(base, "POST", *post(OK)[1:])[0] == 200
        assert len(loaders) == 1 and loaders[0] is not threading.main_thread()
        loaders[0].join(timeout=10)
        assert not loaders[0].is_alive()
        assert request(base, "POST", *post(OK)[1:])[0] == 200  # the loaded model serves on
    with pytest.raises(ZeroDivisionError):  # a failed load fails its request
        asyncio.run(in_own_thread(lambda: 1 / 0))


def test_a_full_queue_answers_429_at_once(tiny_run):
    cfg = ServeConfig(run_dirs=[str(tiny_run)], port=0, max_active=1, queue_size=1,
                      max_tokens=MANY)
    with background(cfg) as base:
        running = open_stream(base)
        parts = urlsplit(base)
        waiting = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        waiting.request("POST", "/v1/completions", body=json.dumps(
            {"model": "tiny", "prompt": "x", "max_tokens": 5, "stream": True}),
            headers={"Content-Type": "application/json"})
        wait_for(lambda: status(base)["waiting"] == 1)
        got, answer = request(base, "POST", *post(OK)[1:])
        assert got == 429 and answer["error"]["code"] == "queue_full"
        # answered while the slot and the queue were still taken: it did not wait for either
        # (the running stream has a million tokens to go; only its close below ends it)
        assert (status(base)["active"], status(base)["waiting"]) == (1, 1)
        running.close()  # the waiting request runs next and ends on its own
        response = waiting.getresponse()
        assert response.read().rstrip().endswith(b"data: [DONE]")
        waiting.close()
        wait_for(lambda: status(base)["active"] == status(base)["waiting"] == 0)


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(tiny_run):
    cfg = ServeConfig(run_dirs=[str(tiny_run)], port=0, max_active=1, queue_size=0,
                      max_tokens=MANY)
    with background(cfg) as base:
        parts = urlsplit(base)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({**OK, "max_tokens": MANY}),
                     headers={"Content-Type": "application/json"})
        wait_for(lambda: status(base)["active"] == 1)
        conn.close()
        wait_for(lambda: status(base)["active"] == 0)


# ---------------------------------------------------------------------------- runs

def test_runs_show_status_and_broken_runs_never_break_the_server(tiny_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "done")
    copy_run(tiny_run, runs / "stopped", max_iters=1000)
    an_hour_ago = time.time() - 3600
    os.utime(runs / "stopped" / "metrics.jsonl", (an_hour_ago, an_hour_ago))
    copy_run(tiny_run, runs / "live", max_iters=1000)
    (runs / "corrupt").mkdir()
    (runs / "corrupt" / "run.json").write_text('{"model": {"n_layer": 2')
    (runs / "corrupt" / "metrics.jsonl").write_text("")
    (runs / "starting").mkdir()
    (runs / "starting" / "metrics.jsonl").write_text(
        '{"kind": "train", "iter": 0, "loss": 4.2}\n{"kind": "train", "it')
    (runs / "not-a-run").mkdir()
    with open(runs / "live" / ".lock", "w") as lock, background(
            ServeConfig(runs_dir=str(runs), port=0)) as base:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a training process holds it
        got = {r["name"]: r for r in request(base, "GET", "/api/runs")[1]["runs"]}
        assert sorted(got) == ["corrupt", "done", "live", "starting", "stopped"]
        assert got["done"]["status"] == "finished" and got["done"]["error"] is None
        assert got["stopped"]["status"] == "interrupted"
        assert got["live"]["status"] == "training"
        assert got["starting"]["status"] == "training"  # fresh metrics, no run.json yet
        assert "corrupt" in got["corrupt"]["error"] and str(runs) not in got["corrupt"]["error"]
        assert got["done"]["model"]["n_layer"] == 2 and got["done"]["config"]["max_iters"] == 40
        assert got["done"]["dataset"] == "shakespeare_char"
        code, answer = request(base, "POST", *post({**OK, "model": "corrupt"})[1:])
        assert code == 400 and answer["error"]["code"] == "model_not_available"
        assert str(runs) not in answer["error"]["message"]
        code, _ = request(base, "POST", *post({**OK, "model": "done"})[1:])
        assert code == 200


def get_page(url: str, path: str) -> tuple[int, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_each_run_has_a_report_card_and_ticked_runs_compare(tiny_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "a")
    copy_run(tiny_run, runs / "b", learning_rate=0.5)
    with background(ServeConfig(runs_dir=str(runs), port=0)) as base:
        code, page = get_page(base, "/api/runs/a/report")
        assert code == 200 and "<title>folio report · a</title>" in page
        assert 'folioChart("loss-");' in page and str(runs) not in page
        code, page = get_page(base, "/api/report?run=a&run=b&x=tokens")
        assert code == 200 and "<title>folio report · a, b</title>" in page
        diff = page.split("Settings that differ between the runs")[1].split("</section>")[0]
        assert "<td>learning_rate</td>" in diff and "<td>0.5</td>" in diff
        assert '"xLabel":"tokens seen"' in page
        assert request(base, "GET", "/api/runs/nope/report")[0] == 404
        assert request(base, "GET", "/api/report")[0] == 400
        assert request(base, "GET", "/api/report?run=a&x=bogus")[0] == 400


def test_metrics_are_read_incrementally_and_torn_lines_wait(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "iter": 0, "loss": 4.0}\n{"kind": "eval", "it')
    with background(ServeConfig(run_dirs=[str(run)], port=0)) as base:
        first = request(base, "GET", "/api/runs/run/metrics?offset=0")[1]
        assert [r["iter"] for r in first["rows"]] == [0] and not first["reset"]
        with open(metrics, "a") as f:
            f.write('er": 0, "iter": 0, "val_loss": 3.9}\n{"kind": "train", "iter": 5, '
                    '"loss": 3.5}\nnot json\n')
        second = request(base, "GET", f"/api/runs/run/metrics?offset={first['offset']}")[1]
        assert [(r["kind"], r["iter"]) for r in second["rows"]] == [("eval", 0), ("train", 5)]
        metrics.write_text('{"kind": "train", "iter": 0, "loss": 4.0}\n')  # a resume rewrote it
        third = request(base, "GET", f"/api/runs/run/metrics?offset={second['offset']}")[1]
        assert third["reset"] and [r["iter"] for r in third["rows"]] == [0]


# ---------------------------------------------------------------------------- command line

def test_serve_takes_several_run_dirs_and_documents_its_settings(capsys):
    cfg = parse_args(ServeConfig, ["a", "b", "--port=9000"]).config
    assert cfg.run_dirs == ["a", "b"] and cfg.port == 9000 and cfg.host == "127.0.0.1"
    assert main(["serve", "--help"]) == 0
    assert "--api_key" in capsys.readouterr().out
    assert main(["serve", "--port=70000"]) == 2


def test_listening_beyond_localhost_without_a_key_warns():
    assert exposure_warning(ServeConfig()) is None
    assert "--api_key" in exposure_warning(ServeConfig(host="0.0.0.0"))
    assert exposure_warning(ServeConfig(host="0.0.0.0", api_key="k")) is None


def test_static_assets_ship_in_the_package():
    static = Path(__import__("folio.infer.serve", fromlist=["x"]).__file__).parent / "static"
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "style.css"}
    assert "http" not in (static / "index.html").read_text().lower().replace("http-equiv", "")


def test_models_load_once_and_the_least_recently_used_is_unloaded(tiny_run, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(tiny_run, tmp_path / name)
    cfg = ServeConfig(run_dirs=[str(tmp_path / "a"), str(tmp_path / "b")], port=0, max_models=1)
    with background(cfg) as base:
        ask = lambda model: request(base, "POST", *post({**OK, "model": model})[1:])[0]
        assert ask("a") == 200 and status(base)["loaded"] == ["a"]
        assert ask("b") == 200 and status(base)["loaded"] == ["b"]
        assert ask("a") == 200 and status(base)["loaded"] == ["a"]


def test_cors_is_off_unless_an_origin_is_given(tiny_run):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}

    def allowed(base: str) -> str | None:
        parts = urlsplit(base)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("OPTIONS", "/v1/completions", headers=preflight)
        origin = conn.getresponse().getheader("access-control-allow-origin")
        conn.close()
        return origin

    with background(ServeConfig(run_dirs=[str(tiny_run)], port=0)) as base:
        assert allowed(base) is None
    cfg = ServeConfig(run_dirs=[str(tiny_run)], port=0, cors_origin="https://app.example")
    with background(cfg) as base:
        assert allowed(base) == "https://app.example"


# ---------------------------------------------------------------------------- batched decoding

def test_concurrent_requests_get_the_text_each_gets_alone(tiny_run):
    """Eight streams at once, batched into one forward pass per step (float32): each one's
    text is the text of the same request alone. tests/test_batched_decode.py compares with
    the one-at-a-time engine too."""
    cfg = ServeConfig(run_dirs=[str(tiny_run)], port=0, dtype="float32", max_tokens=64)
    bodies = [{"model": "tiny", "prompt": prompt, "max_tokens": 20 + 3 * i,
               "temperature": 0.0 if i % 4 == 0 else 1.0, "seed": i, "stream": True}
              for i, prompt in enumerate(["ROMEO:", "\n", "KING HENRY:\nNow", "a", "JULIET",
                                          "First Citizen:\nWe are", "O", "What say you?"])]

    def text(body: dict) -> str:
        chunks = client.completions.create(**body)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with background(cfg) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        together: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: together.update({i: text(bodies[i])}))
                   for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        alone = [text(body) for body in bodies]
    assert [together.get(i) for i in range(len(bodies))] == alone
    assert len(set(alone)) == len(bodies)


class StepGate:
    """Paces the engine: after each step (its events handed to the event loop) the decoding
    thread waits until the test allows more; `free` lets it run."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.allowed: int | None = None  # None: run freely
        self.parked = False

    def __call__(self) -> None:  # from the decoding thread, after a step
        with self.cond:
            while self.allowed == 0:
                self.parked = True
                self.cond.notify_all()
                self.cond.wait()
            self.parked = False
            if self.allowed is not None:
                self.allowed -= 1

    def allow(self, steps: int | None) -> None:
        with self.cond:
            self.allowed = steps
            self.cond.notify_all()

    def wait_parked(self) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.parked, timeout=60)


def test_a_late_request_over_http_streams_its_first_token_after_one_engine_step(
        tiny_run, monkeypatch):
    """Seven streams decode; the engine is held at a step boundary while an eighth request
    comes in over HTTP and is queued; then the engine may make exactly one more step, and
    never another: the late request's first token must come out of that step (admitted at
    the boundary, prefilled and decoded in it, flushed to its stream right after), or it
    never comes and the read times out. Steps are counted, not seconds."""
    gate, stepped, init, ours = StepGate(), Engine._stepped, Engine.__init__, []

    def tracked(engine: Engine, *args, **kwargs) -> None:  # this test's server's engine
        init(engine, *args, **kwargs)
        ours.append(engine)

    def gated(engine: Engine) -> None:
        stepped(engine)
        if engine in ours:  # not another test's server
            gate()

    monkeypatch.setattr(Engine, "__init__", tracked)
    monkeypatch.setattr(Engine, "_stepped", gated)
    cfg = ServeConfig(run_dirs=[str(tiny_run)], port=0, dtype="float32", max_active=8,
                      queue_size=0, max_tokens=MANY)
    with background(cfg) as base:
        busy = [open_stream(base) for _ in range(7)]
        gate.allow(0)
        gate.wait_parked()
        steps = status(base)["steps"]
        parts = urlsplit(base)
        late = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        late.request("POST", "/v1/completions", body=json.dumps(
            {"model": "tiny", "prompt": "KING", "max_tokens": 5, "stream": True}),
            headers={"Content-Type": "application/json"})
        wait_for(lambda: status(base)["waiting"] == 1, timeout=60)
        gate.allow(1)
        response = late.getresponse()  # headers come before any token
        first = response.readline()
        assert first.startswith(b"data: {") and json.loads(first[6:])["choices"][0]["text"]
        gate.wait_parked()
        assert status(base)["steps"] == steps + 1 and status(base)["active"] == 8
        gate.allow(None)
        late.close()
        for conn in busy:
            conn.close()


# ---------------------------------------------------------------------------- pathological bodies

DEEP = 100_000
WITH = b'{"model": "tiny", "prompt": "x", '
PATHOLOGICAL = {
    "a field nested 100,000 levels deep": WITH + b'"metadata": ' + b"[" * DEEP + b"]" * DEEP
    + b"}",
    "a body nested 100,000 levels deep": b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    "an array nested 100,000 levels deep": b"[" * DEEP + b"]" * DEEP,
    "an integer of 5,000 digits": WITH + b'"max_tokens": ' + b"9" * 5000 + b"}",
    "an exponent past float": WITH + b'"temperature": 1e99999}',
    "NaN": WITH + b'"temperature": NaN}',
    "Infinity": WITH + b'"top_p": Infinity}',
    "-Infinity max_tokens": WITH + b'"max_tokens": -Infinity}',
    "a seed past 64 bits": WITH + b'"seed": ' + str(10**30).encode() + b"}",
    "a negative seed past 64 bits": WITH + b'"seed": ' + str(-10**30).encode() + b"}",
    "a float seed past 64 bits": WITH + b'"seed": 1e300}',
    "max_tokens 2**64": WITH + b'"max_tokens": 18446744073709551616}',
    "max_tokens 1e18": WITH + b'"max_tokens": 1e18}',
    "negative n": WITH + b'"n": -1}',
    "negative top_k": WITH + b'"top_k": -3}',
    "negative top_p": WITH + b'"top_p": -0.5}',
    "a lone surrogate in the prompt": b'{"model": "tiny", "prompt": "\\ud800"}',
    "a lone surrogate as a key": WITH + b'"\\udfff": 1}',
    "a lone surrogate as the model": b'{"model": "\\udc00", "prompt": "x"}',
    "a lone surrogate in a stop string": WITH + b'"stop": ["\\ud83d"]}',
    "invalid UTF-8 in a string": b'{"model": "tiny", "prompt": "\xc3\x28"}',
    "a UTF-8 BOM then garbage": b"\xef\xbb\xbf{oops",
    "null": b"null",
    "a string": b'"hello"',
    "a number": b"42",
    "true": b"true",
    "an empty object": b"{}",
    "the model an object": b'{"model": {"name": "tiny"}, "prompt": "x"}',
    "the model a list": b'{"model": ["tiny"], "prompt": "x"}',
    "the prompt an object": b'{"model": "tiny", "prompt": {"text": "x"}}',
    "the prompt a list of numbers": b'{"model": "tiny", "prompt": [1, 2, 3]}',
    "the prompt null, max_tokens a list": b'{"model": "tiny", "prompt": null, '
                                          b'"max_tokens": [1]}',
    "stop a list of lists": WITH + b'"stop": [["a"]]}',
    "stream_options a list": WITH + b'"stream": true, "stream_options": [true]}',
    "duplicate keys, the last one bad": WITH + b'"max_tokens": 2, "max_tokens": "many"}',
}
CHAT_PATHOLOGICAL = {
    "messages an object": {"model": "tiny", "messages": {"role": "user", "content": "x"}},
    "messages a string": {"model": "tiny", "messages": "hi"},
    "a message a list": {"model": "tiny", "messages": [["user", "hi"]]},
    "a message null": {"model": "tiny", "messages": [None]},
    "a role a number": {"model": "tiny", "messages": [{"role": 1, "content": "x"}]},
    "content parts of numbers": {"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}]}]},
    "content nested deep": {"model": "tiny", "messages": [
        {"role": "user", "content": [[[[[[["x"]]]]]]]}]},
    "max_completion_tokens huge": {"model": "tiny", "messages": [
        {"role": "user", "content": "x"}], "max_completion_tokens": 10**20},
}


@pytest.mark.parametrize("case", list(PATHOLOGICAL) + list(CHAT_PATHOLOGICAL))
def test_every_pathological_body_is_a_4xx_never_a_500(url, case):
    if case in PATHOLOGICAL:
        got, answer = request(url, "POST", "/v1/completions", PATHOLOGICAL[case])
    else:
        got, answer = request(url, "POST", "/v1/chat/completions",
                              json.dumps(CHAT_PATHOLOGICAL[case]).encode())
    assert 400 <= got < 500, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]


def test_the_server_still_answers_after_pathological_bodies(url, client):
    for body in PATHOLOGICAL.values():
        request(url, "POST", "/v1/completions", body)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=3).choices[0].text
