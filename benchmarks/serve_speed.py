"""`folio serve` speed: tokens/s of one stream, the aggregate of N concurrent streams, and the
time to first token, for the batched engine (one forward pass per step over every stream) and
the one-at-a-time engine (`--batch=False`) side by side, against `generate_tokens` called
directly in the same process (the ratio is the server's overhead). One JSON line per case,
then a summary line per model: N streams' aggregate over one stream's tokens/s, per engine.

The N-stream case also times a late arrival: a stream started while N-1 others decode, its
time to first token in milliseconds and in engine steps (ms per step from the engine's step
count: /api/status), and in steps beyond one stream's first token on an idle server.

Models are a run dir you give (--run_dir) or random weights of a named shape saved as a run
(speed does not depend on the weights):
  char: the README CPU model (4 layers x 4 heads x 128 wide, block 64), vocab 65
  bpe:  the same body on GPT-2 BPE (vocab 50,257), block 256

    flock /tmp/folio-cpu.lock python benchmarks/serve_speed.py --models=char,bpe
    python benchmarks/serve_speed.py --models=char,bpe --max_tokens=8 --concurrent=2  # a check
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch

from folio.config import ServeConfig
from folio.data.tokenizer import CharTokenizer, GPT2Tokenizer
from folio.infer.sample import generate_tokens, load_run
from folio.infer.serve.app import background
from folio.model.gpt import GPT, GPTConfig
from folio.store import checkpoint, rundir

SHAPES = {
    "char": GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128,
                      bias=False),
    "bpe": GPTConfig(block_size=256, vocab_size=50257, n_layer=4, n_head=4, n_embd=128,
                     bias=False),
}
CHARS = sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
PROMPT = "ROMEO:"


def random_run(path: Path, shape: str) -> Path:
    """A run dir holding randomly initialised weights of `shape`."""
    torch.manual_seed(0)
    cfg = SHAPES[shape]
    tokenizer = CharTokenizer(CHARS) if shape == "char" else GPT2Tokenizer()
    path.mkdir(parents=True)
    model = GPT(cfg)
    checkpoint.save_model_weights(path / rundir.MODEL_FILE, model, {"iter_num": 0})
    rundir.write_run_info(path, rundir.RunInfo(
        model=cfg.to_dict(), n_params=model.num_params(), tokenizer=tokenizer.spec(),
        config={"max_iters": 0}))
    return path


def stream(url: str, model: str, max_tokens: int, seed: int = 1,
           first: threading.Event | None = None) -> dict[str, float]:
    """One streamed completion: seconds to the first text, to the end, and tokens; `first`
    is set at the first text."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                       "temperature": 0.8, "top_k": 200, "stream": True, "seed": seed,
                       "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    ttft, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if ttft is None and event["choices"] and event["choices"][0]["text"]:
            ttft = time.perf_counter() - start
            if first is not None:
                first.set()
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    if first is not None:
        first.set()
    return {"ttft_s": ttft or 0.0, "seconds": time.perf_counter() - start, "tokens": tokens}


def engine_steps(url: str) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", "/api/status")
    steps = json.loads(conn.getresponse().read())["steps"]
    conn.close()
    return steps


def direct(run: Path, max_tokens: int) -> float:
    """tokens/s of generate_tokens on the same model, no server, in a fresh thread as the
    server's decoding thread is (on a busy 2-core machine the main thread's 2-thread
    intra-op pool ran tiny models up to 10x slower than a fresh thread did)."""
    model, tokenizer, _ = load_run(run, "cpu", "float32")
    generator = torch.Generator().manual_seed(1)
    rate = []

    def decode() -> None:
        torch.set_grad_enabled(False)
        start = time.perf_counter()
        n = sum(1 for _ in generate_tokens(model, tokenizer.encode(PROMPT), max_tokens,
                                           0.8, 200, 1.0, generator))
        rate.append(n / (time.perf_counter() - start))

    thread = threading.Thread(target=decode)
    thread.start()
    thread.join()
    return rate[0]


def concurrently(url: str, model: str, max_tokens: int, concurrent: int
                 ) -> tuple[list[dict[str, float]], float, int]:
    """`concurrent` streams started together: their results, the wall time, engine steps."""
    results: list[dict[str, float]] = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        stream(url, model, max_tokens, seed=i))) for i in range(concurrent)]
    steps = engine_steps(url)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start, engine_steps(url) - steps


def late_arrival(url: str, model: str, max_tokens: int, concurrent: int) -> float:
    """Seconds to the first token of a stream started while concurrent-1 others decode."""
    firsts = [threading.Event() for _ in range(concurrent - 1)]
    threads = [threading.Thread(target=stream, args=(url, model, max_tokens, i, first))
               for i, first in enumerate(firsts)]
    for t in threads:
        t.start()
    for first in firsts:
        first.wait()
    late = stream(url, model, min(max_tokens, 16), seed=concurrent)
    for t in threads:
        t.join()
    return late["ttft_s"]


def bench(name: str, run: Path, max_tokens: int, concurrent: int, engines: list[str]) -> None:
    common = {"benchmark": "serve_speed", "model": name, "max_tokens": max_tokens,
              "threads": torch.get_num_threads(), "cpu": platform.processor()
              or platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__}
    direct(run, 16)  # warm-up
    print(json.dumps({**common, "case": "direct", "tokens_per_sec":
                      round(direct(run, max_tokens), 1)}), flush=True)
    summary: dict[str, float] = {}
    for engine in engines:
        cfg = ServeConfig(run_dirs=[str(run)], port=0, device="cpu", dtype="float32",
                          max_active=concurrent, max_tokens=max_tokens,
                          batch=engine == "batched")
        with background(cfg) as url:
            stream(url, run.name, 16)  # warm-up: loads the model
            one = stream(url, run.name, max_tokens)
            one_rate = one["tokens"] / one["seconds"]
            print(json.dumps({**common, "engine": engine, "case": "one_stream",
                              "tokens_per_sec": round(one_rate, 1),
                              "ttft_ms": round(one["ttft_s"] * 1000, 1)}), flush=True)
            results, wall, steps = concurrently(url, run.name, max_tokens, concurrent)
            late = late_arrival(url, run.name, max_tokens, concurrent)
        aggregate = sum(r["tokens"] for r in results) / wall
        step_s = wall / max(steps, 1)
        ttfts = sorted(r["ttft_s"] for r in results)
        print(json.dumps({**common, "engine": engine, "case": f"{concurrent}_streams",
                          "aggregate_tokens_per_sec": round(aggregate, 1),
                          "per_stream_tokens_per_sec": round(
                              sum(r["tokens"] / r["seconds"] for r in results) / concurrent, 1),
                          "ttft_ms_median": round(ttfts[len(ttfts) // 2] * 1000, 1),
                          "ttft_ms_max": round(ttfts[-1] * 1000, 1),
                          "ms_per_step": round(step_s * 1000, 2),
                          "late_ttft_ms": round(late * 1000, 1),
                          "late_ttft_steps": round(late / step_s, 2),
                          # what arriving under load adds to an idle server's first token
                          # (HTTP, prefill, one step): the wait for the step in flight
                          "late_ttft_over_idle_steps": round((late - one["ttft_s"]) / step_s,
                                                             2),
                          "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
        summary[f"{engine}_{concurrent}_vs_1"] = round(aggregate / one_rate, 2)
        summary[f"{engine}_1_stream_tokens_per_sec"] = round(one_rate, 1)
        summary[f"{engine}_{concurrent}_streams_tokens_per_sec"] = round(aggregate, 1)
    if len(engines) == 2:  # the batched engine's N streams against the old engine's 1 and N
        batched = summary[f"batched_{concurrent}_streams_tokens_per_sec"]
        summary[f"batched_{concurrent}_vs_in_turn_1"] = round(
            batched / summary["in_turn_1_stream_tokens_per_sec"], 2)
        summary[f"batched_vs_in_turn_{concurrent}_streams"] = round(
            batched / summary[f"in_turn_{concurrent}_streams_tokens_per_sec"], 2)
    print(json.dumps({**common, "case": "summary", **summary}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="char", help="comma-separated: char, bpe")
    parser.add_argument("--run_dir", default="", help="benchmark this run instead")
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--engines", default="in_turn,batched",
                        help="comma-separated: in_turn (--batch=False), batched")
    args = parser.parse_args()
    engines = args.engines.split(",")
    if not set(engines) <= {"in_turn", "batched"} or args.concurrent < 2:
        parser.error("--engines takes in_turn and/or batched; --concurrent at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cases = ([(Path(args.run_dir).name, Path(args.run_dir))] if args.run_dir else
                 [(m, random_run(Path(tmp) / m, m)) for m in args.models.split(",")])
        for name, run in cases:
            bench(name, run, args.max_tokens, args.concurrent, engines)


if __name__ == "__main__":
    main()
