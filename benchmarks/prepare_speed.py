"""Prepare speed on a large synthetic corpus: folio vs nanoGPT's openwebtext recipe, same run.

The corpus is English-like text made from tiny Shakespeare: its paragraphs shuffled into
documents of 1-20 paragraphs, written as parquet shards until it reaches --size_mb. Cases, each
a fresh child process (peak RSS = the largest sum of RSS over the child and its workers; peak
anonymous RSS leaves out memory-mapped files, which the OS can drop and reread):
  nanogpt      data/openwebtext/prepare.py's approach: load_dataset, train_test_split,
               datasets.map(tiktoken encode_ordinary + EOT, num_proc=cores), memmap write loop
  folio_hf     `folio prepare hf:DIR --val_fraction=0.0005` (the same recipe, same bytes)
  folio_files  `folio prepare DIR --tokenizer=gpt2` (parquet read directly, text layout)
  resume       folio_hf SIGKILLed at a random point, run again; output compared with folio_hf
One JSON line per case, then one with the ratios. Run it on an otherwise idle machine:

    flock /tmp/folio-cpu.lock python benchmarks/prepare_speed.py --size_mb=500
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "tests" / "data" / "tinyshakespeare" / "input.txt"

NANOGPT = """
import os, sys, numpy as np, datasets
from folio.data.tokenizer import gpt2_encoding  # tiktoken's GPT-2, built offline
datasets.disable_progress_bars()
src, out, num_proc = sys.argv[1], sys.argv[2], int(sys.argv[3])
enc = gpt2_encoding()
dataset = datasets.load_dataset(src, num_proc=num_proc)
split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
split_dataset["val"] = split_dataset.pop("test")
def process(example):
    ids = enc.encode_ordinary(example["text"])
    ids.append(enc.eot_token)
    return {"ids": ids, "len": len(ids)}
tokenized = split_dataset.map(process, remove_columns=["text"], desc="tokenizing",
                              num_proc=num_proc)
for split, dset in tokenized.items():
    arr_len = np.sum(dset["len"], dtype=np.uint64)
    filename = os.path.join(out, f"{split}.bin")
    arr = np.memmap(filename, dtype=np.uint16, mode="w+", shape=(arr_len,))
    total_batches = min(1024, len(dset))  # nanoGPT: 1024 (its val split has 4,000+ rows)
    idx = 0
    for batch_idx in range(total_batches):
        batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True)
        batch = batch.with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx : idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
"""


def make_corpus(directory: Path, size_mb: int, seed: int = 0) -> dict:
    """Parquet shards of shuffled Shakespeare paragraphs, about size_mb of UTF-8 text."""
    paragraphs = [p for p in SHAKESPEARE.read_text("utf-8").split("\n\n") if p.strip()]
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    target, written, docs, shard = size_mb * 1_000_000, 0, 0, 0
    while written < target:
        batch = []
        for _ in range(20_000):
            batch.append("\n\n".join(rng.choices(paragraphs, k=rng.randint(1, 20))))
        pq.write_table(pa.table({"text": batch}), directory / f"train-{shard:04d}.parquet")
        written += sum(len(d.encode()) for d in batch)
        docs += len(batch)
        shard += 1
    return {"mb": round(written / 1e6, 1), "documents": docs, "shards": shard}


def run_case(args: list[str], env: dict, kill_after_s: float | None = None) -> dict:
    """Run a child to completion (or kill it), sampling its process tree's RSS."""
    start = time.perf_counter()
    child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, text=True)
    proc, peak, peak_anon = psutil.Process(child.pid), 0, 0
    while child.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
            peak_anon = max(peak_anon, sum(_anonymous_rss(p.pid) for p in tree))
        except (psutil.Error, OSError):
            pass
        if kill_after_s is not None and time.perf_counter() - start > kill_after_s:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            break
        time.sleep(0.05)
    out, err = child.communicate()
    if kill_after_s is None and child.returncode != 0:
        raise SystemExit(f"{args[:4]} failed:\n{err[-2000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak / 2**20,
            "peak_anon_rss_mb": peak_anon / 2**20, "returncode": child.returncode}


def _anonymous_rss(pid: int) -> int:
    """Resident memory not backed by a file (RSS minus memory-mapped files and libraries)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def tokens_in(directory: Path) -> int:
    return sum((directory / f"{s}.bin").stat().st_size // 2 for s in ("train", "val"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=int, default=500, help="corpus size (UTF-8 MB)")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cases", default="nanogpt,folio_hf,folio_files,resume")
    parser.add_argument("--workdir", default="", help="where the corpus and outputs go")
    opts = parser.parse_args()
    cases = opts.cases.split(",")
    with tempfile.TemporaryDirectory(prefix="folio-prepare-bench-", dir=opts.workdir or None) \
            as tmp:
        root = Path(tmp)
        corpus = make_corpus(root / "corpus", opts.size_mb)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
        common = {"benchmark": "prepare_speed", "cores": opts.cores, "corpus": corpus,
                  "cpu": platform.processor() or platform.machine()}
        results = {}

        def case(name: str, args: list[str], out: Path, cache: str) -> None:
            out.mkdir(parents=True, exist_ok=True)
            case_env = {**env, "HF_DATASETS_CACHE": str(root / "hf-cache" / cache)}
            r = run_case([sys.executable, *args], case_env)
            tokens = tokens_in(out)
            r.update(tokens=tokens, docs_per_s=corpus["documents"] / r["seconds"],
                     tokens_per_s=tokens / r["seconds"])
            results[name] = r
            print(json.dumps({**common, "case": name, **_rounded(r)}), flush=True)

        folio_hf = ["-m", "folio", "prepare", f"hf:{root / 'corpus'}", "--val_fraction=0.0005",
                    f"--num_proc={opts.cores}", "--name=out", f"--data_dir={root / 'folio_hf'}"]
        if "nanogpt" in cases:
            case("nanogpt", ["-c", NANOGPT, str(root / "corpus"), str(root / "nanogpt"),
                             str(opts.cores)], root / "nanogpt", "nanogpt")
        if "folio_hf" in cases:
            case("folio_hf", folio_hf, root / "folio_hf" / "out", "folio_hf")
        if "folio_files" in cases:
            case("folio_files", ["-m", "folio", "prepare", str(root / "corpus"), "--name=out",
                                 "--tokenizer=gpt2", f"--num_proc={opts.cores}",
                                 f"--data_dir={root / 'folio_files'}"],
                 root / "folio_files" / "out", "folio_files")
        if "nanogpt" in results and "folio_hf" in results:
            same = all((root / "nanogpt" / f"{s}.bin").read_bytes() ==
                       (root / "folio_hf" / "out" / f"{s}.bin").read_bytes()
                       for s in ("train", "val"))
            n, f = results["nanogpt"], results["folio_hf"]
            print(json.dumps({**common, "case": "ratios", "same_bytes_as_nanogpt": same,
                              "throughput_folio_hf_over_nanogpt":
                                  round(f["tokens_per_s"] / n["tokens_per_s"], 3),
                              "peak_rss_folio_hf_over_nanogpt":
                                  round(f["peak_rss_mb"] / n["peak_rss_mb"], 3),
                              "peak_anon_rss_folio_hf_over_nanogpt":
                                  round(f["peak_anon_rss_mb"] / n["peak_anon_rss_mb"], 3),
                              **({"throughput_folio_files_over_nanogpt": round(
                                  results["folio_files"]["tokens_per_s"] / n["tokens_per_s"], 3),
                                  "peak_rss_folio_files_over_nanogpt": round(
                                  results["folio_files"]["peak_rss_mb"] / n["peak_rss_mb"], 3)}
                                 if "folio_files" in results else {})}), flush=True)
        if "resume" in cases and "folio_hf" in results:
            resumed = folio_hf[:-1] + [f"--data_dir={root / 'resume'}"]
            case_env = {**env, "HF_DATASETS_CACHE": str(root / "hf-cache" / "folio_hf")}
            kill_at = random.uniform(0.3, 0.8) * results["folio_hf"]["seconds"]
            killed = run_case([sys.executable, *resumed], case_env, kill_after_s=kill_at)
            again = run_case([sys.executable, *resumed], case_env)
            same = all((root / "resume" / "out" / name).read_bytes() ==
                       (root / "folio_hf" / "out" / name).read_bytes()
                       for name in ("train.bin", "val.bin"))
            print(json.dumps({**common, "case": "resume", "killed_after_s": round(kill_at, 1),
                              "killed_returncode": killed["returncode"],
                              "rerun_seconds": round(again["seconds"], 1),
                              "uninterrupted_seconds": round(results["folio_hf"]["seconds"], 1),
                              "identical_output": same}), flush=True)


def _rounded(r: dict) -> dict:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}


if __name__ == "__main__":
    main()
