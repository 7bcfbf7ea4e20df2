"""Sampling speed and start-up on the CPU: folio's KV cache vs nanoGPT-style recompute.

For each model, 1,000 new tokens from a one-token prompt (so the window fills and slides):
folio with its KV cache as `folio sample` decodes (the measured CPU fast path,
infer/fastdecode.py) and in plain float32, folio without the cache, and nanoGPT's `generate`
(crop the context to block_size, a full forward pass for every token, top-k over the whole
vocabulary), all in this run; one JSON line per model with tokens/s and the ratios. Models
are randomly initialised at the real shapes (speed does not depend on the weights):
  cpu_char: nanoGPT's README CPU char model (4 x 4 x 128, block 64), as `folio bench` cpu_char
  gpu_char: nanoGPT's README char model (config/train_shakespeare_char.py), 6 x 6 x 384, block 256
  seed_bpe: the seed user's BPE model (4 layers x 4 heads x 64 wide, GPT-2's vocabulary), block 256
Then one line of start-up figures for --startup_model, each a fresh process timed from outside:
`python -c "import torch"`, `folio train --max_iters=0` (it also writes the run dir), and
`folio sample` of that run for 1 token (time to first token) and for 1,000 tokens.

    flock /tmp/folio-cpu.lock python benchmarks/sample_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from folio.infer.sample import generate_tokens
from folio.model.gpt import GPT, GPTConfig
from folio.speed.autotune import cpu_identity
from folio.speed.decoding import for_decoding

SHAPES = {
    "cpu_char": GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128,
                          bias=False),
    "gpu_char": GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384,
                      dropout=0.2, bias=False),
    "seed_bpe": GPTConfig(block_size=256, vocab_size=50257, n_layer=4, n_head=4, n_embd=64,
                          bias=False),
}
TEMPERATURE, TOP_K = 0.8, 200  # the defaults of both samplers


@torch.no_grad()
def nanogpt_generate(model: GPT, idx: torch.Tensor, max_new_tokens: int,
                     generator: torch.Generator) -> torch.Tensor:
    """nanoGPT's GPT.generate: crop to block_size, full forward, top-k, softmax, multinomial."""
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= model.config.block_size \
            else idx[:, -model.config.block_size:]
        logits = model(idx_cond)  # (1, V_padded): the last position only
        logits = logits[:, :model.config.vocab_size] / TEMPERATURE
        v, _ = torch.topk(logits, min(TOP_K, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("Inf")
        probs = F.softmax(logits, dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def timed(run, new_tokens: int) -> float:
    """tokens/s of `run(n)`, which generates n tokens."""
    run(8)  # warm-up: allocator, kernels
    start = time.perf_counter()
    run(new_tokens)
    return new_tokens / (time.perf_counter() - start)


def bench_model(name: str, new_tokens: int) -> dict:
    torch.manual_seed(0)
    model = GPT(SHAPES[name]).eval()

    fast, choice = for_decoding(model, "auto", new_tokens)  # what `folio sample` decodes with

    def folio(use_cache: bool, decoder: GPT = model):
        def run(n: int) -> None:
            gen = torch.Generator().manual_seed(1337)
            for _ in generate_tokens(decoder, [0], n, TEMPERATURE, TOP_K, generator=gen,
                                     use_cache=use_cache):
                pass
        return run

    def nanogpt(n: int) -> None:
        nanogpt_generate(model, torch.zeros((1, 1), dtype=torch.long), n,
                         torch.Generator().manual_seed(1337))

    rates = {"kv_cache": timed(folio(True, fast), new_tokens),
             "kv_cache_float32": timed(folio(True), new_tokens),
             "folio_recompute": timed(folio(False), new_tokens),
             "nanogpt_recompute": timed(nanogpt, new_tokens)}
    return {"benchmark": "sample_speed", "model": name, "shape": SHAPES[name].to_dict(),
            "new_tokens": new_tokens, "decoding": choice.line,
            **{k: round(v, 1) for k, v in rates.items()},
            "kv_cache_over_nanogpt": round(rates["kv_cache"] / rates["nanogpt_recompute"], 2),
            "kv_cache_float32_over_nanogpt":
                round(rates["kv_cache_float32"] / rates["nanogpt_recompute"], 2),
            "kv_cache_over_folio_recompute":
                round(rates["kv_cache"] / rates["folio_recompute"], 2)}


def wall(args: list[str], env: dict[str, str]) -> float:
    """Seconds a fresh process running `args` takes, start to exit (stdout discarded)."""
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def startup(model: str, new_tokens: int, repeats: int) -> dict:
    """Best-of-`repeats` wall times of fresh processes, in one run so they compare."""
    from folio.speed.bench import bench_data_dir

    python = sys.executable
    env = dict(os.environ)
    shape = SHAPES[model]
    with bench_data_dir("", {"shakespeare_char"}) as data_dir, \
            tempfile.TemporaryDirectory(prefix="folio-sample-bench-") as tmp:
        run_dir = str(Path(tmp) / model)
        env["FOLIO_CACHE"] = os.environ["FOLIO_CACHE"]  # bench_data_dir may have seeded one
        train = [python, "-m", "folio", "train", "--dataset=shakespeare_char",
                 f"--data_dir={data_dir}", f"--out_dir={run_dir}", "--device=cpu",
                 f"--n_layer={shape.n_layer}", f"--n_head={shape.n_head}",
                 f"--n_embd={shape.n_embd}", f"--block_size={shape.block_size}",
                 "--max_iters=0", "--eval_iters=1", "--batch_size=1", "--compile=False",
                 "--overwrite=True"]  # each repeat starts the run again
        sample = [python, "-m", "folio", "sample", f"--out_dir={run_dir}", "--device=cpu",
                  "--num_samples=1", "--seed=1337"]
        times: dict[str, list[float]] = {"import_torch_s": [], "train_max_iters_0_s": [],
                                         "sample_first_token_s": [],
                                         f"sample_{new_tokens}_tokens_s": []}
        for _ in range(repeats):  # interleaved, so drift hits every figure alike
            times["import_torch_s"].append(wall([python, "-c", "import torch"], env))
            times["train_max_iters_0_s"].append(wall(train, env))
            times["sample_first_token_s"].append(wall(sample + ["--max_new_tokens=1"], env))
            times[f"sample_{new_tokens}_tokens_s"].append(
                wall(sample + [f"--max_new_tokens={new_tokens}"], env))
    best = {k: round(min(v), 2) for k, v in times.items()}
    return {"benchmark": "startup", "model": model, **best,
            "first_token_over_import_torch_s":
                round(best["sample_first_token_s"] - best["import_torch_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cpu_char,gpu_char,seed_bpe",
                        help=f"comma-separated: {', '.join(SHAPES)} (empty: none)")
    parser.add_argument("--tokens", type=int, default=1000, help="new tokens per case")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--startup_model", default="cpu_char", choices=sorted(SHAPES),
                        help="the model `folio train` / `folio sample` start up with")
    parser.add_argument("--startup_repeats", type=int, default=3,
                        help="fresh processes per start-up figure (0: skip start-up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = {"cpu": cpu_identity(), "threads": args.threads, "torch": torch.__version__}
    for name in filter(None, (m.strip() for m in args.models.split(","))):
        print(json.dumps({**bench_model(name, args.tokens), **machine}), flush=True)
    if args.startup_repeats:
        figures = startup(args.startup_model, args.tokens, args.startup_repeats)
        print(json.dumps({**figures, **machine}), flush=True)


if __name__ == "__main__":
    main()
