"""`folio serve` speed: tokens/s of one stream, the aggregate of N concurrent streams, and the
time to first token, for the batched engine (one forward pass per step over every stream) and
the one-at-a-time engine (`--batch=False`) side by side, against `generate_tokens` called
directly in this process (the ratio is the server's overhead). The server is `folio serve` in a
process of its own, its clients in another (serve_clients.py), as users run them. Each engine runs
`--rounds` rounds of: one stream alone, N streams together, a late arrival; the figures are
the medians of the rounds (the N-vs-1 ratio: of each round's own ratio). One JSON line per
case, then a summary line per model: N streams' aggregate over one stream's tokens/s, per engine.

The late arrival is a stream started while N-1 others decode: its time to first token in
milliseconds and in engine steps (ms per step from the engine's step count: /api/status), and
in steps beyond one stream's first token on an idle server.

Models are a run dir you give (--run_dir) or random weights of a named shape saved as a run
(speed does not depend on the weights):
  char: the README CPU model (4 layers x 4 heads x 128 wide, block 64), vocab 65
  bpe:  the same body on GPT-2 BPE (vocab 50,257), block 256

    flock /tmp/folio-cpu.lock python benchmarks/serve_speed.py --models=char,bpe
    python benchmarks/serve_speed.py --models=char --max_tokens=8 --concurrent=2 --rounds=1
    python benchmarks/serve_speed.py --models=char,bpe --device=cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from serve_clients import PROMPT

from folio.data.tokenizer import CharTokenizer, GPT2Tokenizer
from folio.infer.sample import generate_tokens, load_run
from folio.model.gpt import GPT, GPTConfig
from folio.speed.autotune import cpu_identity
from folio.store import checkpoint, rundir

SHAPES = {
    "char": GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128,
                      bias=False),
    "bpe": GPTConfig(block_size=256, vocab_size=50257, n_layer=4, n_head=4, n_embd=128,
                     bias=False),
}
CHARS = sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
CLIENTS = Path(__file__).with_name("serve_clients.py")
T = TypeVar("T")


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


@contextlib.contextmanager
def served(run: Path, device: str, concurrent: int, max_tokens: int, batch: bool
           ) -> Iterator[str]:
    """`folio serve` of `run` in a process of its own, as users run it; yields its URL. (In
    this process, beside the benchmark's own torch work, its steps ran up to 2x slower: on 2
    cores, torch ops on another thread of the process slowed the decoding thread's.)"""
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "folio", "serve", str(run), f"--port={port}", f"--device={device}",
         "--dtype=float32", f"--max_active={concurrent}", f"--max_tokens={max_tokens}",
         f"--batch={batch}"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/api/status", timeout=5).close()
                break
            if server.poll() is not None:
                raise RuntimeError("folio serve did not start")
            time.sleep(0.1)
        else:
            raise RuntimeError("folio serve did not answer within a minute")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def clients(url: str, model: str, case: str, max_tokens: int, concurrent: int = 2) -> dict:
    """One case of serve_clients.py, run in a process of its own."""
    out = subprocess.run([sys.executable, str(CLIENTS), url, model, case,
                          f"--max_tokens={max_tokens}", f"--concurrent={concurrent}"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def direct(run: Path, max_tokens: int, device: str) -> float:
    """tokens/s of generate_tokens on the same model, no server."""
    return in_thread(lambda: one_stream(run, max_tokens, device))


def one_stream(run: Path, max_tokens: int, device: str) -> float:
    torch.set_grad_enabled(False)
    model, tokenizer, _ = load_run(run, device, "float32")
    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    n = sum(1 for _ in generate_tokens(model, tokenizer.encode(PROMPT), max_tokens, 0.8, 200,
                                       1.0, generator))
    return n / (time.perf_counter() - start)


def in_thread(fn: Callable[[], T]) -> T:
    """fn() in a thread that ends with it: this process's torch work all runs so, since a
    thread that lives on keeps its OpenMP team, and beside it another thread's small torch
    ops ran up to 2x slower (see folio serve's in_own_thread)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def bench(name: str, run: Path, max_tokens: int, concurrent: int, engines: list[str],
          rounds: int, device: str) -> None:
    common = {"benchmark": "serve_speed", "model": name, "max_tokens": max_tokens,
              "device": device, "threads": torch.get_num_threads(), "cpu": cpu_identity(),
              "torch": torch.__version__}
    if device.startswith("cuda"):
        common["gpu"] = torch.cuda.get_device_name(device)
    direct(run, 16, device)  # warm-up
    print(json.dumps({**common, "case": "direct", "tokens_per_sec":
                      round(direct(run, max_tokens, device), 1)}), flush=True)
    summary: dict[str, float] = {}
    for engine in engines:
        with served(run, device, concurrent, max_tokens, engine == "batched") as url:
            clients(url, run.name, "one", 16)  # warm-up: loads the model
            measured = [measure(url, run.name, max_tokens, concurrent) for _ in range(rounds)]
        middle = {key: statistics.median(m[key] for m in measured) for key in measured[0]}
        print(json.dumps({**common, "engine": engine, "case": "one_stream",
                          "tokens_per_sec": round(middle["one_rate"], 1),
                          "ttft_ms": round(middle["one_ttft_s"] * 1000, 1)}), flush=True)
        print(json.dumps({**common, "engine": engine, "case": f"{concurrent}_streams",
                          "aggregate_tokens_per_sec": round(middle["aggregate"], 1),
                          "per_stream_tokens_per_sec": round(middle["per_stream"], 1),
                          "ttft_ms_median": round(middle["ttft_s"] * 1000, 1),
                          "ms_per_step": round(middle["step_s"] * 1000, 2),
                          "late_ttft_ms": round(middle["late_s"] * 1000, 1),
                          "late_ttft_steps": round(middle["late_steps"], 2),
                          # what arriving under load adds to an idle server's first token
                          # (HTTP, prefill, one step): the wait for the step in flight
                          "late_ttft_over_idle_steps": round(middle["late_over_idle"], 2),
                          f"{concurrent}_vs_1_each_round": [round(m["ratio"], 2)
                                                           for m in measured],
                          "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
        summary[f"{engine}_{concurrent}_vs_1"] = round(middle["ratio"], 2)
        summary[f"{engine}_1_stream_tokens_per_sec"] = round(middle["one_rate"], 1)
        summary[f"{engine}_{concurrent}_streams_tokens_per_sec"] = round(middle["aggregate"], 1)
    if len(engines) == 2:  # the batched engine's N streams against the old engine's 1 and N
        batched = summary[f"batched_{concurrent}_streams_tokens_per_sec"]
        summary[f"batched_{concurrent}_vs_in_turn_1"] = round(
            batched / summary["in_turn_1_stream_tokens_per_sec"], 2)
        summary[f"batched_vs_in_turn_{concurrent}_streams"] = round(
            batched / summary[f"in_turn_{concurrent}_streams_tokens_per_sec"], 2)
    print(json.dumps({**common, "case": "summary", "rounds": rounds, **summary}), flush=True)


def measure(url: str, model: str, max_tokens: int, concurrent: int) -> dict[str, float]:
    """One round: one stream alone, then `concurrent` together, then a late arrival; the
    figures of each and the ratio of the round (one round's cases run back to back, so a
    machine whose speed drifts moves both sides of it alike)."""
    one = clients(url, model, "one", max_tokens)
    together = clients(url, model, "many", max_tokens, concurrent)
    late = clients(url, model, "late", max_tokens, concurrent)
    streams, wall = together["streams"], together["seconds"]
    one_rate = one["tokens"] / one["seconds"]
    aggregate = sum(r["tokens"] for r in streams) / wall
    step_s = wall / max(together["steps"], 1)
    return {"one_rate": one_rate, "one_ttft_s": one["ttft_s"], "aggregate": aggregate,
            "ratio": aggregate / one_rate,
            "per_stream": statistics.mean(r["tokens"] / r["seconds"] for r in streams),
            "ttft_s": statistics.median(r["ttft_s"] for r in streams), "step_s": step_s,
            "late_s": late["ttft_s"], "late_steps": late["ttft_s"] / step_s,
            "late_over_idle": (late["ttft_s"] - one["ttft_s"]) / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="char", help="comma-separated: char, bpe")
    parser.add_argument("--run_dir", default="", help="benchmark this run instead")
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every case per engine; figures are their medians")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--engines", default="in_turn,batched",
                        help="comma-separated: in_turn (--batch=False), batched")
    args = parser.parse_args()
    engines = args.engines.split(",")
    if not set(engines) <= {"in_turn", "batched"} or args.concurrent < 2:
        parser.error("--engines takes in_turn and/or batched; --concurrent at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server's
    with tempfile.TemporaryDirectory() as tmp:
        cases = ([(Path(args.run_dir).name, Path(args.run_dir))] if args.run_dir else
                 [(m, in_thread(lambda m=m: random_run(Path(tmp) / m, m)))
                  for m in args.models.split(",")])
        for name, run in cases:
            bench(name, run, args.max_tokens, args.concurrent, engines, args.rounds,
                  args.device)


if __name__ == "__main__":
    main()
