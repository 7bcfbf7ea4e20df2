"""`folio prepare`: tiny Shakespeare's exact counts, your own files, and every bad input."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from folio.cli import main
from folio.data import layout, sources
from folio.data import prepare as data
from folio.data.tokenizer import GPT2Tokenizer, load_tokenizer

SHAKESPEARE_LINES = {
    "shakespeare_char": ["length of dataset in characters: 1,115,394", "vocab size: 65 (char)",
                         "train has 1,003,854 tokens", "val has 111,540 tokens"],
    "shakespeare": ["vocab size: 50,257 (gpt2)", "train has 301,966 tokens",
                    "val has 36,059 tokens"],
}


def prepare(capsys, *args: str) -> tuple[int, str, str]:
    """Run `folio prepare ARGS` through the real CLI: (exit code, stdout, stderr)."""
    code = main(["prepare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def read_dataset(path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    meta = json.loads((path / "meta.json").read_text("utf-8"))
    train, val = (np.fromfile(path / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val"))
    return meta, train, val


def decoded(path: Path) -> str:
    _, train, val = read_dataset(path)
    tok = load_tokenizer(path)
    return tok.decode(train.tolist()) + tok.decode(val.tolist())


def assert_fails(capsys, args: list, match: str, data_dir: Path) -> str:
    """A one-line `folio: error:` on stderr, exit code 2, and nothing left in data_dir."""
    code, _, err = prepare(capsys, *args, f"--data_dir={data_dir}")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("folio: error: ")
    assert "Traceback" not in err
    assert match in err, err
    assert not data_dir.exists() or not any(p.is_file() for p in data_dir.rglob("*"))
    return err


def text_file(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("FOLIO_CACHE", str(cache))
    return cache


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server on loopback serving files from a tmp dir: (root dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------- tiny Shakespeare

@pytest.mark.parametrize("dataset", ["shakespeare_char", "shakespeare"])
def test_tiny_shakespeare_gives_the_exact_counts(dataset, shakespeare_cache, tmp_path, capsys):
    code, out, _ = prepare(capsys, dataset, f"--data_dir={tmp_path}")
    assert code == 0
    for line in SHAKESPEARE_LINES[dataset]:
        assert line in out.splitlines()
    assert "downloading" not in out  # a good cached copy means no network
    meta, train, val = read_dataset(tmp_path / dataset)
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert meta["dtype"] == "uint16" and meta["source_sha256"] == data.SHAKESPEARE_SHA256
    assert meta["tokenizer"]["kind"] == ("char" if dataset == "shakespeare_char" else "gpt2")
    text = (shakespeare_cache / "tinyshakespeare" / "input.txt").read_text("utf-8")
    assert decoded(tmp_path / dataset) == text


@pytest.mark.slow
def test_prepare_from_the_command_line_end_to_end(shakespeare_cache, tmp_path):
    env = {**os.environ, "FOLIO_CACHE": str(shakespeare_cache)}
    result = subprocess.run([sys.executable, "-m", "folio", "prepare", "shakespeare_char"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train has 1,003,854 tokens" in result.stdout
    assert sorted(p.name for p in (tmp_path / "data" / "shakespeare_char").iterdir()) == [
        "meta.json", "train.bin", "val.bin"]


def test_source_url_is_downloaded_verified_and_cached(seeded_cache, empty_cache, http_root,
                                                       tmp_path, capsys):
    root, url = http_root
    text_file(root / "input.txt", (seeded_cache / "tinyshakespeare" / "input.txt").read_bytes())
    code, out, _ = prepare(capsys, "shakespeare_char", f"--source={url}/input.txt",
                           f"--data_dir={tmp_path / 'data'}")
    assert code == 0 and "train has 1,003,854 tokens" in out
    cached = empty_cache / "tinyshakespeare" / "input.txt"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == data.SHAKESPEARE_SHA256


def test_corrupt_download_is_refused_and_nothing_is_kept(empty_cache, http_root, tmp_path,
                                                         capsys):
    root, url = http_root
    text_file(root / "input.txt", "First Citizen:\nnot quite the real file\n")
    err = assert_fails(capsys, ["shakespeare", f"--source={url}/input.txt"], "is corrupt: sha256",
                       tmp_path / "data")
    assert data.SHAKESPEARE_SHA256 in err
    assert not any(p.is_file() for p in empty_cache.rglob("*"))


def test_offline_without_cache_says_where_to_put_the_file(empty_cache, tmp_path, capsys):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/input.txt"
    err = assert_fails(capsys, ["shakespeare_char", f"--source={url}"], f"cannot download {url}",
                       tmp_path / "data")
    assert str(empty_cache / "tinyshakespeare" / "input.txt") in err


def test_local_source_must_be_tiny_shakespeare(shakespeare_cache, tmp_path, capsys):
    other = text_file(tmp_path / "other.txt", "some other text\n" * 10)
    assert_fails(capsys, ["shakespeare_char", f"--source={other}"], "is not tiny Shakespeare",
                 tmp_path / "data")
    good = shakespeare_cache / "tinyshakespeare" / "input.txt"
    code, out, _ = prepare(capsys, "shakespeare", f"--source={good}", "--tokenizer=char",
                           "--name=sc", f"--data_dir={tmp_path / 'data'}")
    assert code == 0 and "train has 1,003,854 tokens" in out
    assert (tmp_path / "data" / "sc" / "meta.json").is_file()


# ---------------------------------------------------------------------------- your own text

def test_text_file_with_non_ascii_round_trips(tmp_path, capsys):
    text = "Ça va? héllo wörld — 日本語 🎭\n" * 20
    path = text_file(tmp_path / "poems.txt", text)
    code, out, _ = prepare(capsys, path, f"--data_dir={tmp_path / 'data'}")
    assert code == 0 and f"length of dataset in characters: {len(text):,}" in out
    meta, train, val = read_dataset(tmp_path / "data" / "poems")
    assert meta["name"] == "poems" and meta["vocab_size"] == len(set(text))
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    assert decoded(tmp_path / "data" / "poems") == text


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_directory_of_non_ascii_files_round_trips(tmp_path, capsys, tokenizer):
    docs = tmp_path / "docs"
    text_file(docs / "a.txt", "Ça va? — 日本語 and naïve café\n")
    text_file(docs / "empty.txt", "")
    text_file(docs / "sub" / "b.txt", "emoji 🎭 Ωμέγα, ok")
    text_file(docs / "notes.md", "any text file is read, in name order")
    code, _, _ = prepare(capsys, docs, f"--tokenizer={tokenizer}", "--name=mydocs",
                         f"--data_dir={tmp_path / 'data'}")
    assert code == 0
    expected = layout.DOC_SEPARATOR.join(["Ça va? — 日本語 and naïve café\n",
                                          "any text file is read, in name order",
                                          "emoji 🎭 Ωμέγα, ok"])
    assert decoded(tmp_path / "data" / "mydocs") == expected
    meta, _, _ = read_dataset(tmp_path / "data" / "mydocs")
    assert meta["source_sha256"] == hashlib.sha256(expected.encode()).hexdigest()


def test_jsonl_text_fields_are_joined(tmp_path, capsys):
    lines = [json.dumps({"text": "première ligne", "id": 1}), "",
             json.dumps({"text": "二行目 🎭"}), json.dumps({"text": "third line"})]
    path = text_file(tmp_path / "corpus.jsonl", "\n".join(lines) + "\n")
    code, _, _ = prepare(capsys, path, f"--data_dir={tmp_path / 'data'}")
    assert code == 0
    assert decoded(tmp_path / "data" / "corpus") == layout.DOC_SEPARATOR.join(
        ["première ligne", "二行目 🎭", "third line"])


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_gpt2_in_small_pieces_equals_encoding_the_whole_text(tmp_path, capsys, monkeypatch,
                                                             keep_newlines):
    monkeypatch.setattr(sources, "PIECE_BYTES", 200)  # force many pieces and cuts
    monkeypatch.setattr(layout, "PIECE_CHARS", 200)
    monkeypatch.setattr(layout, "CHUNK_CHARS", 300)
    raw = ("First Citizen:\r\nBefore we  proceed,\n\n  hear me   speak.\nAll:\tSpeak, speak.  \n"
           "日本語 🎭 café's 'tis\r") * 40
    path = text_file(tmp_path / "t.txt", raw)
    assert prepare(capsys, path, "--tokenizer=gpt2", f"--data_dir={tmp_path}",
                   f"--keep_newlines={keep_newlines}")[0] == 0
    _, train, val = read_dataset(tmp_path / "t")
    text = raw if keep_newlines else raw.replace("\r\n", "\n").replace("\r", "\n")
    split = int(len(text) * 0.9)
    tok = GPT2Tokenizer()
    assert train.tolist() == tok.encode(text[:split])
    assert val.tolist() == tok.encode(text[split:])


def test_char_vocab_over_65536_is_stored_as_uint32(tmp_path, capsys):
    chars = [chr(c) for c in range(0x20, 0x20 + 70_000) if not 0xD800 <= c < 0xE000]
    text = "".join(chars) + "".join(reversed(chars))
    path = text_file(tmp_path / "wide.txt", text)
    assert prepare(capsys, path, f"--data_dir={tmp_path}")[0] == 0
    meta, train, val = read_dataset(tmp_path / "wide")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(chars)
    assert decoded(tmp_path / "wide") == text


def test_failed_prepare_keeps_an_existing_dataset(tmp_path, capsys):
    good = text_file(tmp_path / "good.txt", "good text, repeated. " * 10)
    assert prepare(capsys, good, "--name=x", f"--data_dir={tmp_path / 'data'}")[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "data" / "x").iterdir()}
    bad = text_file(tmp_path / "bad.txt", b"ok \xff")
    code, _, _ = prepare(capsys, bad, "--name=x", f"--data_dir={tmp_path / 'data'}")
    assert code == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "data" / "x").iterdir()} == before


# ---------------------------------------------------------------------------- bad input

BAD_INPUTS = {
    # id: (files to create {name: content}, args (TMP replaced by tmp_path), expected message)
    "missing_path": ({}, ["TMP/missing.txt"], "missing.txt does not exist"),
    "missing_dir": ({}, ["TMP/no/such/dir/"], "does not exist"),
    "empty_file": ({"empty.txt": b""}, ["TMP/empty.txt"], "empty.txt is empty"),
    "not_utf8": ({"latin1.txt": "café".encode("latin-1")}, ["TMP/latin1.txt"],
                 "latin1.txt is not UTF-8 text: invalid byte at offset 3"),
    "unknown_dataset": ({}, ["shakespear"], "unknown dataset 'shakespear'; did you mean "
                        "shakespeare? (known: shakespeare_char, shakespeare"),
    "too_short": ({"tiny.txt": b"x"}, ["TMP/tiny.txt"], "too short for a non-empty train and val"),
    "val_fraction_zero": ({"t.txt": b"text " * 9}, ["TMP/t.txt", "--val_fraction=0"],
                          "val_fraction=0.0 must be > 0"),
    "val_fraction_one": ({"t.txt": b"text " * 9}, ["TMP/t.txt", "--val_fraction", "1"],
                         "val_fraction=1.0 is too large; expected a number between 0 and 1"),
    "val_fraction_nan": ({"t.txt": b"text " * 9}, ["TMP/t.txt", "--val_fraction=nan"],
                         "val_fraction=nan is not a finite number"),
    "unknown_tokenizer": ({"t.txt": b"text " * 9}, ["TMP/t.txt", "--tokenizer=bpe"],
                          "tokenizer='bpe' is not allowed; expected one of auto, char, gpt2"),
    "jsonl_bad_json": ({"c.jsonl": b'{"text": "a"}\n{"text": oops}\n'}, ["TMP/c.jsonl"],
                       "c.jsonl line 2 is not valid JSON"),
    "jsonl_no_text": ({"c.jsonl": b'{"text": "a"}\n\n{"body": "b"}\n'}, ["TMP/c.jsonl"],
                      'c.jsonl line 3 has no string "text" field'),
    "dir_without_text": ({"d/logo.png": b"\x89PNG\r\n\x1a\n\0\0"}, ["TMP/d"],
                         "has no text files (1 binary file(s) skipped)"),
    "source_for_a_path": ({"t.txt": b"text " * 9}, ["TMP/t.txt", "--source=x.txt"],
                          "--source only applies to shakespeare_char, shakespeare, openwebtext"),
    "bad_name": ({"t.txt": b"text " * 9}, ["TMP/t.txt", "--name=a/b"],
                 "must be a plain directory name"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    files, args, message = BAD_INPUTS[case]
    for name, content in files.items():
        text_file(tmp_path / name, content)
    monkeypatch.chdir(tmp_path)
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    assert_fails(capsys, args, message, tmp_path / "data")


def test_unwritable_data_dir_is_one_line_error(tmp_path, capsys):
    text = text_file(tmp_path / "t.txt", "some text " * 10)
    blocker = text_file(tmp_path / "a_file", "not a directory")
    assert_fails(capsys, [text, "--data_dir", blocker / "data"], "cannot write the dataset to",
                 blocker / "data")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_fails(capsys, [text], "choose a writable --data_dir", locked)


def test_non_utf8_offset_counts_bytes_across_read_pieces(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 4)  # "日" is split between two reads
    bad = text_file(tmp_path / "bad.txt", "ab日c".encode() + b"\xffd")
    assert_fails(capsys, [bad], "bad.txt is not UTF-8 text: invalid byte at offset 6",
                 tmp_path / "data")
    truncated = text_file(tmp_path / "cut.txt", b"abcdef" + "日".encode()[:2])
    assert_fails(capsys, [truncated], "invalid byte at offset 6", tmp_path / "data")
