"""The clients of `serve_speed.py`, in a process of their own (as a server's clients are: in
the server's process they would hold its interpreter lock while they parse), standard library
only. One case per call; prints one JSON object:

    python benchmarks/serve_clients.py URL MODEL one  --max_tokens=256
    python benchmarks/serve_clients.py URL MODEL many --max_tokens=256 --concurrent=8
    python benchmarks/serve_clients.py URL MODEL late --max_tokens=256 --concurrent=8

one: a streamed completion: seconds to its first text, to its end, and its tokens.
many: `concurrent` streams started together: each one's result, the wall time, engine steps.
late: the time to first token of a stream started while concurrent-1 others decode.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from urllib.parse import urlsplit

PROMPT = "ROMEO:"


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
    """The server's engine steps so far (/api/status)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", "/api/status")
    steps = json.loads(conn.getresponse().read())["steps"]
    conn.close()
    return steps


def many(url: str, model: str, max_tokens: int, concurrent: int) -> dict:
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
    return {"streams": results, "seconds": time.perf_counter() - start,
            "steps": engine_steps(url) - steps}


def late(url: str, model: str, max_tokens: int, concurrent: int) -> dict:
    """Seconds to the first token of a stream started while concurrent-1 others decode."""
    firsts = [threading.Event() for _ in range(concurrent - 1)]
    threads = [threading.Thread(target=stream, args=(url, model, max_tokens, i, first))
               for i, first in enumerate(firsts)]
    for t in threads:
        t.start()
    for first in firsts:
        first.wait()
    arrival = stream(url, model, min(max_tokens, 16), seed=concurrent)
    for t in threads:
        t.join()
    return arrival


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("case", choices=["one", "many", "late"])
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()
    if args.case == "one":
        result = stream(args.url, args.model, args.max_tokens)
    else:
        case = many if args.case == "many" else late
        result = case(args.url, args.model, args.max_tokens, args.concurrent)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
