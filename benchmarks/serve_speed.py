"""`folio serve` speed: tokens/s of one stream, the aggregate of N concurrent streams, and the
time to first token, against `generate_tokens` called directly in the same process (the ratio
is the server's overhead). One JSON line per case.

Models are a run dir you give (--run_dir) or random weights of a named shape saved as a run
(speed does not depend on the weights):
  char: the README CPU model (4 layers x 4 heads x 128 wide, block 64), vocab 65
  bpe:  the same body on GPT-2 BPE (vocab 50,257), block 256

    flock /tmp/folio-cpu.lock python benchmarks/serve_speed.py --models=char,bpe
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


def stream(url: str, model: str, max_tokens: int) -> dict[str, float]:
    """One streamed completion: seconds to the first text, to the end, and tokens."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                       "temperature": 0.8, "top_k": 200, "stream": True, "seed": 1,
                       "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if first is None and event["choices"] and event["choices"][0]["text"]:
            first = time.perf_counter() - start
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    return {"ttft_s": first or 0.0, "seconds": time.perf_counter() - start, "tokens": tokens}


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


def bench(name: str, run: Path, max_tokens: int, concurrent: int) -> None:
    common = {"benchmark": "serve_speed", "model": name, "max_tokens": max_tokens,
              "threads": torch.get_num_threads(), "cpu": platform.processor()
              or platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__}
    direct(run, 16)  # warm-up
    print(json.dumps({**common, "case": "direct", "tokens_per_sec":
                      round(direct(run, max_tokens), 1)}), flush=True)
    cfg = ServeConfig(run_dirs=[str(run)], port=0, device="cpu", dtype="float32",
                      max_active=concurrent, max_tokens=max_tokens)
    with background(cfg) as url:
        stream(url, run.name, 16)  # warm-up: loads the model
        one = stream(url, run.name, max_tokens)
        print(json.dumps({**common, "case": "one_stream",
                          "tokens_per_sec": round(one["tokens"] / one["seconds"], 1),
                          "ttft_ms": round(one["ttft_s"] * 1000, 1)}), flush=True)
        results: list[dict[str, float]] = []
        threads = [threading.Thread(target=lambda: results.append(
            stream(url, run.name, max_tokens))) for _ in range(concurrent)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        ttfts = sorted(r["ttft_s"] for r in results)
        print(json.dumps({**common, "case": f"{concurrent}_streams",
                          "aggregate_tokens_per_sec": round(sum(r["tokens"] for r in results)
                                                            / wall, 1),
                          "per_stream_tokens_per_sec": round(
                              sum(r["tokens"] / r["seconds"] for r in results) / concurrent, 1),
                          "ttft_ms_median": round(ttfts[len(ttfts) // 2] * 1000, 1),
                          "ttft_ms_max": round(ttfts[-1] * 1000, 1),
                          "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="char", help="comma-separated: char, bpe")
    parser.add_argument("--run_dir", default="", help="benchmark this run instead")
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cases = ([(Path(args.run_dir).name, Path(args.run_dir))] if args.run_dir else
                 [(m, random_run(Path(tmp) / m, m)) for m in args.models.split(",")])
        for name, run in cases:
            bench(name, run, args.max_tokens, args.concurrent)


if __name__ == "__main__":
    main()
