"""Sampling speed on the CPU: KV cache vs full recompute, in the same run.

For each model, 1,000 new tokens from a one-token prompt (so the window fills and slides),
with the KV cache and with a full forward pass over the window for every token (nanoGPT's
way); one JSON line per case, then one with the speedup. Models are randomly initialised at
realistic shapes (speed does not depend on the weights), block_size 256:
  char: the shakespeare_char GPU preset, 6 layers x 6 heads x 384 wide, vocab 65
  bpe:  folio's default CPU model (4 layers x 4 heads x 128 wide) on GPT-2 BPE, vocab 50,257

    flock /tmp/folio/cpu.lock python benchmarks/sample_speed.py --models=char --threads=2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from folio.infer.sample import generate_tokens
from folio.model.gpt import GPT, GPTConfig

SHAPES = {
    "char": GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384,
                      bias=False),
    "bpe": GPTConfig(block_size=256, vocab_size=50257, n_layer=4, n_head=4, n_embd=128,
                     bias=False),
}


def tokens_per_sec(model: GPT, new_tokens: int, use_cache: bool) -> tuple[float, float]:
    """(tokens/s, seconds) for new_tokens sampled at the CLI defaults (T=0.8, top_k=200)."""
    generator = torch.Generator().manual_seed(1337)
    start = time.perf_counter()
    n = sum(1 for _ in generate_tokens(model, [0], new_tokens, generator=generator,
                                       use_cache=use_cache))
    seconds = time.perf_counter() - start
    return n / seconds, seconds


def bench(name: str, new_tokens: int) -> None:
    torch.manual_seed(0)
    cfg = SHAPES[name]
    model = GPT(cfg).eval()
    common = {"benchmark": "sample_speed", "model": name, "shape": cfg.to_dict(),
              "params_M": round(model.num_params() / 1e6, 2), "new_tokens": new_tokens,
              "threads": torch.get_num_threads(), "device": "cpu",
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    for use_cache in (True, False):  # warm-up: allocator, kernels, tokenizer-free paths
        tokens_per_sec(model, 8, use_cache)
    rates = {}
    for case, use_cache in (("kv_cache", True), ("recompute", False)):
        rate, seconds = tokens_per_sec(model, new_tokens, use_cache)
        rates[case] = rate
        print(json.dumps({**common, "case": case, "tokens_per_sec": round(rate, 1),
                          "seconds": round(seconds, 2),
                          "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
    print(json.dumps({**common, "case": "speedup",
                      "kv_cache_over_recompute": round(rates["kv_cache"] / rates["recompute"], 2)}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="char,bpe", help="comma-separated: char, bpe")
    parser.add_argument("--tokens", type=int, default=1000, help="new tokens per case")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        bench(name.strip(), args.tokens)


if __name__ == "__main__":
    main()
