"""Byte-level BPE trainers side by side: training time (wall and CPU) on one corpus, and the
compression each reaches (bytes per token on held-out text), at the same vocabulary size,
split pattern (GPT-4's) and special tokens. Each trainer runs in its own process.

    python benchmarks/tokenizer_trainers.py CORPUS.txt HELDOUT.txt --vocab_size 8192 \
        --trainers hf,rustbpe,bpeasy
    python benchmarks/tokenizer_trainers.py CORPUS.txt HELDOUT.txt --encode TOKENIZER_DIR

Prints one JSON line per trainer and names the CPU. The trainers' merges are loaded into
tiktoken to encode the held-out text (the same encoder for all); `exact` says whether
tiktoken's ids equal the trainer's own encoder's on it (rustbpe's, tokenizers').
rustbpe and bpeasy are not dependencies of folio: install them to compare
(`pip install rustbpe bpeasy`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from pathlib import Path

GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}|"""
                r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BLOCK_CHARS = 1 << 16


def blocks(text: str):
    """The corpus in ~64K-character pieces cut after a newline (the same for every trainer)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + BLOCK_CHARS)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def train_hf(text: str, vocab: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(blocks(text), trainer)
    from folio.data.bpe_files import byte_level_alphabet
    alphabet = byte_level_alphabet()
    merged = sorted((i, t) for t, i in tok.get_vocab().items() if t not in SPECIALS)
    ranks = {bytes(alphabet[c] for c in t): rank for rank, (_, t) in enumerate(merged)}
    first = len(SPECIALS)  # tokenizers numbers the special tokens first
    return ranks, lambda s: [i - first for i in tok.encode(s).ids]


def train_rustbpe(text: str, vocab: int):
    import rustbpe

    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(blocks(text), vocab_size=vocab - len(SPECIALS), pattern=GPT4_PATTERN)
    return {bytes(k): v for k, v in tok.get_mergeable_ranks()}, tok.encode


def train_bpeasy(text: str, vocab: int):
    from bpeasy import train_bpe_stream

    ranks = train_bpe_stream(blocks(text), GPT4_PATTERN, 128, vocab - len(SPECIALS), 1000)
    return ranks, None


TRAINERS = {"hf": train_hf, "rustbpe": train_rustbpe, "bpeasy": train_bpeasy}


def measure(name: str, corpus: str, heldout: str, vocab: int, queue) -> None:
    import tiktoken

    text = Path(corpus).read_text("utf-8")
    wall, cpu = time.perf_counter(), time.process_time()
    ranks, own_encode = TRAINERS[name](text, vocab)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    offset = max(ranks.values()) + 1
    enc = tiktoken.Encoding(name, pat_str=GPT4_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: offset + i for i, s in enumerate(SPECIALS)})
    held = Path(heldout).read_text("utf-8")
    ids = enc.encode_ordinary(held)
    exact = None if own_encode is None else own_encode(held) == ids
    t = time.perf_counter()
    enc.encode_ordinary_batch(list(blocks(text[:20_000_000])))
    encode_s = time.perf_counter() - t
    queue.put({"trainer": name, "corpus_mb": round(len(text.encode()) / 1e6, 1),
               "vocab_size": enc.n_vocab, "train_wall_s": round(wall, 1),
               "train_cpu_s": round(cpu, 1), "heldout_bytes_per_token":
               round(len(held.encode()) / len(ids), 3), "exact": exact,
               "round_trip": enc.decode(ids) == held,
               "tiktoken_encode_mb_per_s": round(20 / encode_s, 1)})


def encode_speed(directory: str, corpus: str, mb: int = 10) -> dict:
    """Encoding speed of a trained tokenizer dir on the first `mb` MB of `corpus`, one thread
    each: tiktoken from its ranks (folio's encoder) against `tokenizers` from its
    tokenizer.json; and whether the ids agree."""
    from folio.data.tokenizer import BPETokenizer, HFTokenizer

    text = Path(corpus).read_text("utf-8")[:mb * 1_000_000]
    pieces = list(blocks(text))
    out = {"encode_mb": round(len(text.encode()) / 1e6, 1)}
    ids = {}
    for name, tok in (("tiktoken", BPETokenizer(directory)),
                      ("tokenizers", HFTokenizer(directory))):
        t = time.perf_counter()
        ids[name] = [tok.encode(p) for p in pieces]
        out[f"{name}_mb_per_s"] = round(out["encode_mb"] / (time.perf_counter() - t), 2)
    out["same_ids"] = ids["tiktoken"] == ids["tokenizers"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("heldout")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--trainers", default="hf,rustbpe,bpeasy")
    parser.add_argument("--encode", metavar="DIR", help="instead: the encoding speed of the "
                        "tokenizer dir DIR on CORPUS (tiktoken against tokenizers)")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    print(json.dumps({"cpu": cpu, "cores": multiprocessing.cpu_count()}), flush=True)
    if args.encode:
        print(json.dumps(encode_speed(args.encode, args.corpus)), flush=True)
        return
    context = multiprocessing.get_context("spawn")
    for name in args.trainers.split(","):
        queue = context.Queue()
        child = context.Process(target=measure, args=(name, args.corpus, args.heldout,
                                                      args.vocab_size, queue))
        child.start()
        print(json.dumps(queue.get()), flush=True)
        child.join()


if __name__ == "__main__":
    main()
