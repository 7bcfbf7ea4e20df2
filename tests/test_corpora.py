"""Real corpora: every local format, wide vocabularies, Hugging Face datasets, kill and resume."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import REPO, SHAKESPEARE_TEXT, tiny_args
from test_prepare import prepare, read_dataset

from folio.cli import main
from folio.data import layout, writer
from folio.data.tokenizer import GPT2Tokenizer, load_tokenizer

DOCS = ["première ligne\nof the first document", "二行目 🎭 second", "third, and last."]


def jsonl(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def write_format(path: Path, docs: list[str], field: str = "text") -> Path:
    """`docs` written in the format its name says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), path)
    elif path.name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(jsonl(docs, field)))
    elif path.name.endswith(".jsonl.zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(docs, field)))
    else:
        path.write_bytes(jsonl(docs, field))
    return path


def shakespeare_docs() -> list[str]:
    return [d for d in SHAKESPEARE_TEXT.read_text("utf-8").split("\n\n") if d.strip()]


# ---------------------------------------------------------------------------- local formats

@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"])
def test_every_record_format_gives_the_documents_joined(name, tmp_path, capsys):
    path = write_format(tmp_path / name, DOCS, field="body")
    code, _, _ = prepare(capsys, path, "--text_field=body", "--tokenizer=gpt2",
                         f"--data_dir={tmp_path}")
    assert code == 0
    meta, train, val = read_dataset(tmp_path / "c")
    assert meta["name"] == "c" and meta["documents"] == 3 and meta["text_field"] == "body"
    assert GPT2Tokenizer().decode(train.tolist() + val.tolist()) == "\n\n".join(DOCS)


def test_a_glob_of_mixed_shards_is_read_in_name_order(tmp_path, capsys):
    write_format(tmp_path / "shards" / "part-0.jsonl.zst", DOCS[:1])
    write_format(tmp_path / "shards" / "part-1.parquet", DOCS[1:2])
    (tmp_path / "shards" / "part-2.txt").write_text(DOCS[2], "utf-8")
    (tmp_path / "shards" / "other.jsonl").write_text('{"text": "not matched"}\n', "utf-8")
    code, _, _ = prepare(capsys, tmp_path / "shards" / "part-*", f"--data_dir={tmp_path}")
    assert code == 0
    assert load_tokenizer(tmp_path / "shards").decode(
        np.concatenate(read_dataset(tmp_path / "shards")[1:]).tolist()) == "\n\n".join(DOCS)


@pytest.mark.parametrize("args, message", [
    (["c.parquet", "--text_field=content"], 'c.parquet has no column "content" (columns: text, n)'),
    (["c.jsonl.zst", "--text_field=content"], 'line 1 has no string "content" field'),
    (["nothing-*.jsonl"], "no files match"),
    (["broken.jsonl.gz"], "broken.jsonl.gz: "),
])
def test_bad_corpus_is_one_line_error(args, message, tmp_path, capsys, monkeypatch):
    write_format(tmp_path / "c.parquet", DOCS)
    write_format(tmp_path / "c.jsonl.zst", DOCS)
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(jsonl(DOCS))[:-12])
    monkeypatch.chdir(tmp_path)
    code, _, err = prepare(capsys, *args, f"--data_dir={tmp_path / 'data'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------- wide vocabularies

def wide_tokenizer(directory: Path, size: int = 70_000) -> Path:
    """A Hugging Face word-level tokenizer with `size` ids, saved as a tokenizer directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(size - 2)} | {"[UNK]": size - 2, "<|endoftext|>": size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.mark.slow
def test_tokenizer_over_65535_ids_writes_uint32_that_trains(tmp_path, capsys):
    tok_dir = wide_tokenizer(tmp_path / "tok")
    rng = random.Random(0)
    # 5-digit ids, so the 90% split falls on a space (7 * 2700 - 1 characters of train).
    words = [f"w{rng.choice([rng.randrange(10_000, 10_100), rng.randrange(65_536, 69_998)])}"
             for _ in range(3_000)]
    (tmp_path / "words.txt").write_text(" ".join(words), "utf-8")
    code, out, _ = prepare(capsys, tmp_path / "words.txt", f"--tokenizer=hf:{tok_dir}",
                           f"--data_dir={tmp_path / 'data'}")
    assert code == 0 and "vocab size: 70,000 (hf)" in out
    meta, train, val = read_dataset(tmp_path / "data" / "words")
    assert meta["dtype"] == "uint32" and meta["tokenizer"] == {"kind": "hf", "path": str(tok_dir)}
    ids = np.concatenate([train, val])
    assert ids.max() >= 65_536 and len(ids) == len(words)
    assert [f"w{i}" for i in ids] == words
    assert main(["train", *tiny_args(tmp_path / "data", tmp_path / "run", max_iters=2,
                                     eval_interval=2, block_size=16),
                 "--dataset=words"]) == 0


# ---------------------------------------------------------------------------- Hugging Face

@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    """A `datasets`-loadable directory of parquet files standing in for the hub's openwebtext."""
    root = tmp_path_factory.mktemp("hub") / "owt"
    docs = shakespeare_docs()[:2_400]
    for i in range(2):
        write_format(root / f"train-{i}.parquet", docs[i::2])
    return root


def expected_nanogpt_split(hub: Path, test_size: float) -> dict[str, list[int]]:
    """nanoGPT's data/openwebtext/prepare.py, written out: split, encode_ordinary + EOT."""
    import datasets

    data = datasets.load_dataset(str(hub), split="train")
    parts = data.train_test_split(test_size=test_size, seed=2357, shuffle=True)
    enc = GPT2Tokenizer()
    out = {}
    for split, name in (("train", "train"), ("val", "test")):
        out[split] = [t for doc in parts[name]["text"] for t in enc.encode(doc) + [enc.eot_id]]
    return out


@pytest.mark.slow
def test_openwebtext_recipe_matches_nanogpt_split_and_eot(hub_dir, tmp_path, capsys):
    code, out, _ = prepare(capsys, "openwebtext", f"--source={hub_dir}", "--num_proc=2",
                           f"--data_dir={tmp_path}")
    assert code == 0
    meta, train, val = read_dataset(tmp_path / "openwebtext")
    expected = expected_nanogpt_split(hub_dir, 0.0005)
    assert train.tolist() == expected["train"] and val.tolist() == expected["val"]
    eot = GPT2Tokenizer.eot_id
    assert (train == eot).sum() == 2_400 - 2 and (val == eot).sum() == 2  # ceil(2400 * 0.0005)
    assert train[-1] == eot and val[-1] == eot
    assert meta["layout"] == "documents" and meta["val_fraction"] == 0.0005
    assert meta["documents"] == 2_400


@pytest.mark.slow
def test_resume_at_the_train_val_boundary_goes_on_with_val(hub_dir):
    """Regression: a prepare killed right after the last train chunk resumed with
    select(range(n, n)), which datasets refuses (IndexError, CI of stop 19)."""
    from folio.data.hub import HubSource

    hub = HubSource(str(hub_dir), None, "train", "text", 0.0005)
    hub.load()
    n_train = hub.num_rows("train")
    resumed = list(layout.document_items(hub, skip=n_train))
    assert [split for split, _, _ in resumed] == [1, 1]
    assert [text for _, text, _ in resumed] == list(hub.documents("val"))
    assert list(layout.document_items(hub, skip=hub.num_rows())) == []


def resident_kb(paths: set[str]) -> int:
    """This process's resident memory in mappings of `paths` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
                inside = len(fields) == 6 and fields[5] in paths
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_reading_a_hub_split_releases_the_cache_pages_it_touched(tmp_path, monkeypatch):
    from folio.data import hub as hub_module
    from folio.data.mapped_pages import MappedFiles

    # ~16 MB of text: reading one row maps up to a whole page-cache folio (up to 2 MB)
    write_format(tmp_path / "big" / "train.parquet", shakespeare_docs() * 15)
    monkeypatch.setattr(hub_module, "BATCH_ROWS", 1)
    source = hub_module.HubSource(str(tmp_path / "big"), None, "train", "text", 0.0005)
    source.load()
    paths = {os.path.realpath(f) for f in source.splits["train"].files}
    n = source.num_rows("train")

    def read_all_but_one() -> tuple[list[str], int]:
        """Every text but the last, and the files' resident KB with the reader still open."""
        docs = source.documents("train")
        return [next(docs) for _ in range(n - 1)], resident_kb(paths)

    with monkeypatch.context() as patched:
        patched.setattr(MappedFiles, "release", lambda self: None)
        expected, kept = read_all_but_one()  # every page touched, nothing released
    texts, released = read_all_but_one()
    assert texts == expected  # released pages read back correctly
    assert kept > 8_000 and released < kept / 2, (kept, released)


@pytest.mark.slow
def test_any_hf_dataset_with_its_own_split_and_field(tmp_path, capsys):
    hub = tmp_path / "corpus"
    write_format(hub / "data.jsonl", DOCS * 10, field="content")
    code, out, _ = prepare(capsys, f"hf:{hub}", "--text_field=content", "--val_fraction=0.1",
                           f"--data_dir={tmp_path}")
    assert code == 0
    meta, train, val = read_dataset(tmp_path / "corpus")
    assert (val == GPT2Tokenizer.eot_id).sum() == 3 and meta["documents"] == 30
    code, _, err = prepare(capsys, f"hf:{hub}", "--split=validation", f"--data_dir={tmp_path}")
    assert code == 2 and "cannot load hf:" in err and "--split" in err
    write_format(tmp_path / "one" / "data.jsonl", DOCS[:1])
    code, _, err = prepare(capsys, f"hf:{tmp_path / 'one'}", f"--data_dir={tmp_path}")
    assert code == 2 and "has 1 rows: too few to split at val_fraction=0.1" in err


@pytest.mark.slow
def test_offline_without_a_cached_copy_is_one_line_naming_the_download(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
           "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-m", "folio", "prepare", "openwebtext",
                             f"--data_dir={tmp_path / 'data'}"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "cannot load hf:openwebtext[train]" in result.stderr
    assert "with network access to download it (about 55 GB)" in result.stderr


@pytest.mark.slow
def test_a_missing_text_field_of_a_hub_dataset_is_one_line(tmp_path):
    write_format(tmp_path / "corpus" / "train.parquet", shakespeare_docs() * 20)  # ~22 MB
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    for _ in range(2):  # the second loads from a warm cache, where a Pool's child was
        # terminated mid-cleanup and the exit printed a leaked-semaphore warning
        result = subprocess.run([sys.executable, "-m", "folio", "prepare",
                                 f"hf:{tmp_path / 'corpus'}", "--text_field=body",
                                 f"--data_dir={tmp_path / 'data'}"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr  # no traceback, no warning
        assert "has no column 'body' (columns: text, n); pass --text_field=NAME" in result.stderr


@pytest.mark.slow
def test_gpt2_124m_trains_on_a_prepared_mini_openwebtext(hub_dir, tmp_path, capsys):
    assert prepare(capsys, "openwebtext", f"--source={hub_dir}", f"--data_dir={tmp_path}")[0] == 0
    code = main(["train", "gpt2_124m", "--max_iters=2", "--n_layer=2", "--n_head=2",
                 "--n_embd=64", "--block_size=32", "--batch_size=2",
                 "--gradient_accumulation_steps=1", "--eval_iters=1", "--eval_interval=2",
                 "--warmup_iters=1", "--device=cpu", "--compile=False", "--dtype=float32",
                 f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"])
    assert code == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text("utf-8"))
    assert run["config"]["dataset"] == "openwebtext"


# ---------------------------------------------------------------------------- kill and resume

CHILD = """
import sys
from folio.data import layout, writer
layout.CHUNK_CHARS = layout.PIECE_CHARS = 1 << 14
writer.COMMIT_EVERY_S = 0.0
from folio.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_child(args: list[str], kill_after_progress_s: float | None = None) -> int | None:
    """`folio ARGS` in a child with small chunks; optionally SIGKILLed once it has progress."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    if kill_after_progress_s is None:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        return 0
    progress = Path([a for a in args if a.startswith("--data_dir=")][0][11:]) / "c" / \
        writer.WORK_DIR / "progress.json"
    deadline = time.monotonic() + 120
    while not progress.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(kill_after_progress_s)
    os.killpg(child.pid, signal.SIGKILL)  # the child and its tokenizer workers
    child.wait()
    return child.returncode


@pytest.mark.slow
@pytest.mark.parametrize("source, tokenizer", [("file", "gpt2"), ("file", "char"),
                                               ("hub", "gpt2")])
def test_killed_prepare_resumes_to_the_same_bytes(source, tokenizer, tmp_path):
    docs = shakespeare_docs()
    random.Random(1).shuffle(docs)
    docs = [d.replace("\n", "\r\n") if i % 3 == 0 else d for i, d in enumerate(docs)]
    if source == "file":
        write_format(tmp_path / "c.jsonl.zst", docs)
        dataset_arg = str(tmp_path / "c.jsonl.zst")
    else:
        write_format(tmp_path / "hub" / "c.parquet", docs)
        dataset_arg = f"hf:{tmp_path / 'hub'}"
    common = [dataset_arg, "--name=c", f"--tokenizer={tokenizer}", "--num_proc=2"]
    run_child(["prepare", *common, f"--data_dir={tmp_path / 'whole'}"])
    killed = tmp_path / "killed"
    # a kill that lands after the (small) prepare has finished tests nothing: kill sooner
    for delay in (random.Random().uniform(0.0, 0.3), 0.05, 0.0, 0.0):
        shutil.rmtree(killed, ignore_errors=True)
        code = run_child(["prepare", *common, f"--data_dir={killed}"],
                         kill_after_progress_s=delay)
        if not (killed / "c" / "meta.json").exists():
            break
    assert code == -signal.SIGKILL
    assert not (killed / "c" / "meta.json").exists()  # an interrupted prepare never looks done
    state = json.loads((killed / "c" / writer.WORK_DIR / "progress.json").read_text())
    assert state["chunks"] > 0
    run_child(["prepare", *common, f"--data_dir={killed}"])
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (killed / "c" / name).read_bytes() == \
            (tmp_path / "whole" / "c" / name).read_bytes(), name
    assert not (killed / "c" / writer.WORK_DIR).exists()
    meta, train, _ = read_dataset(killed / "c")
    assert meta["normalised"]["crlf"] == sum(d.count("\r\n") for d in docs)
    assert meta["train_sha256"] == hashlib.sha256(train.tobytes()).hexdigest()


def test_resume_prints_what_it_skips_and_changed_settings_start_over(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(layout, "CHUNK_CHARS", 1 << 12)
    monkeypatch.setattr(layout, "PIECE_CHARS", 1 << 12)
    path = write_format(tmp_path / "c.jsonl", shakespeare_docs()[:400])

    class Stop(Exception):
        pass

    def stop_after_three(self, split, ids, totals, _write=writer.TokenWriter.write):
        if self.chunks_done == 3:
            raise Stop
        _write(self, split, ids, totals)
        self.commit()

    with monkeypatch.context() as patch:
        patch.setattr(writer.TokenWriter, "write", stop_after_three)
        with pytest.raises(Stop):
            main(["prepare", str(path), "--tokenizer=gpt2", f"--data_dir={tmp_path}"])
    capsys.readouterr()
    code, out, _ = prepare(capsys, path, "--tokenizer=gpt2", f"--data_dir={tmp_path}")
    assert code == 0 and "resuming: 3 chunks already written" in out
    code, out, _ = prepare(capsys, path, "--tokenizer=char", f"--data_dir={tmp_path}")
    assert code == 0 and "resuming" not in out


def parse_prepare(argv: list[str], cls):
    from folio.cli.args import parse_args

    return parse_args(cls, argv).config


@pytest.mark.parametrize("args, config", [([], "sample-10BT"), (["--tokens=100B"], "sample-100BT"),
                                          (["--tokens=350BT"], "sample-350BT"),
                                          (["--tokens=sample-100BT"], "sample-100BT")])
def test_fineweb_edu_names_its_sample(args, config):
    from folio.config import PrepareConfig
    from folio.data.prepare import resolve_source

    cfg = parse_prepare(["fineweb-edu", *args], PrepareConfig)
    _, hub, name = resolve_source(cfg)
    assert (hub.path, hub.config, hub.val_fraction, name) == (
        "HuggingFaceFW/fineweb-edu", config, 0.0005, "fineweb-edu")


@pytest.mark.parametrize("args, message", [
    (["fineweb-edu", "--tokens=7B"], "--tokens=7B is not a sample of fineweb-edu"),
    (["openwebtext", "--tokenizer=char"], "needs a BPE tokenizer"),
    (["hf:", "--tokenizer=gpt2"], "names no dataset"),
    (["x.txt", "--tokenizer=tiktoken:no_such_encoding"], "tiktoken has no encoding"),
    (["x.txt", "--tokenizer=hf:/no/such/dir"], "tokenizer.json not found"),
])
def test_bad_hub_or_tokenizer_choice_is_one_line_error(args, message, tmp_path, capsys,
                                                       monkeypatch):
    (tmp_path / "x.txt").write_text("some text " * 20, "utf-8")
    monkeypatch.chdir(tmp_path)
    code, _, err = prepare(capsys, *args, f"--data_dir={tmp_path / 'data'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_progress_line_shows_docs_tokens_rates_and_eta(monkeypatch):
    from folio.data import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    bar = progress.Progress("prepare", total=1_000)
    bar.skip(50, 1_000, 400_000)  # found done on resume: not part of the rates
    now[0] = 110.0
    bar.update(200, 4_000, 1_600_000)
    assert bar.line() == ("prepare:  25.0% | 5,000 docs (400/s) | 2,000,000 tokens (160,000/s) "
                          "| ETA 0m37s")


def test_interrupted_finish_completes_on_the_next_run(tmp_path, capsys, monkeypatch):
    path = write_format(tmp_path / "c.jsonl", DOCS * 20)
    args = [str(path), f"--data_dir={tmp_path}"]
    moves = []

    def interrupted(self, _move=writer.TokenWriter._move_into_place):
        moves.append(self)
        if len(moves) == 1:
            raise KeyboardInterrupt  # after meta.json is in the work dir, before any move
        _move(self)

    monkeypatch.setattr(writer.TokenWriter, "_move_into_place", interrupted)
    assert main(["prepare", *args]) == 130
    assert not (tmp_path / "c" / "meta.json").exists()
    assert (tmp_path / "c" / writer.WORK_DIR / "meta.json").exists()
    code, out, _ = prepare(capsys, *args)
    assert code == 0 and len(moves) == 2 and "resuming" not in out
    meta, train, val = read_dataset(tmp_path / "c")
    assert meta["train_tokens"] == len(train) and not (tmp_path / "c" / writer.WORK_DIR).exists()


# ---------------------------------------------------------------------------- loader

def test_loader_reads_shards_as_their_concatenation_and_resumes_exactly(char_data_dir,
                                                                        tmp_path):
    import shutil

    import torch

    from folio.data.loader import Loader, open_tokens

    single = char_data_dir / "shakespeare_char"
    sharded = tmp_path / "sharded"
    shutil.copytree(single, sharded)
    meta = json.loads((sharded / "meta.json").read_text("utf-8"))
    train = np.fromfile(sharded / "train.bin", dtype=meta["dtype"])
    (sharded / "train.bin").unlink()
    cuts = [0, 1_000, 400_000, len(train)]  # a tiny shard, so windows span shard edges
    meta["train_files"] = [f"train-{i}.bin" for i in range(3)]
    for i, name in enumerate(meta["train_files"]):
        train[cuts[i]:cuts[i + 1]].tofile(sharded / name)
    (sharded / "meta.json").write_text(json.dumps(meta), "utf-8")

    def loader(directory: Path) -> Loader:
        tokens = open_tokens(directory, "train", meta if directory == sharded else
                             json.loads((directory / "meta.json").read_text("utf-8")))
        return Loader(tokens, batch_size=64, block_size=32, seed=7, device=torch.device("cpu"))

    a, b = loader(single), loader(sharded)
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a.next_batch(), b.next_batch(), strict=True))
    state = b.state_dict()
    expected = b.next_batch()
    resumed = loader(sharded)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(resumed.next_batch(), expected, strict=True))
    assert main(["train", *tiny_args(tmp_path, tmp_path / "run", max_iters=2, eval_interval=2),
                 "--dataset=sharded"]) == 0

    with open(sharded / "train-2.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)
    from folio.errors import DataError
    with pytest.raises(DataError, match=r"train-2.bin\) is truncated or corrupt"):
        open_tokens(sharded, "train", meta)
