"""`folio tokenizer train|eval`, `folio prepare --tokenizer=DIR` and reading folders of any
text: training, saving, loading, exact round trips, prepare -> train -> sample, bad input."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from folio.cli import main
from folio.config import MIN_BPE_VOCAB
from folio.data import bpe_files
from folio.data.clean import Cleaner
from folio.data.tokenizer import (
    BPETokenizer,
    HFTokenizer,
    gpt2_encoding,
    gpt2_vocab_file,
    tokenizer_from_spec,
)
from folio.errors import DataError
from folio.store.rundir import read_run_info

DOCS = {  # a little of everything the split pattern and the merges meet
    "en.txt": "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, "
              "speak. We're told it's 1,234,567 o'clock; don't we'll they've I'M!\n",
    "code.py": "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif x>=10:\n        "
               "print(f'{x=}')\n",
    "intl.md": "# Ça va?\n日本語のテキスト、中文文本。Ωμέγα — naïve café, Straße; 한국어 🎭👩‍🔬\n",
    "spaces.txt": "a  b   c\t\td\n\n\n   \n trailing   \nx\u00a0y\u2003z\n",
    "crlf.txt": "\ufeffwindows\r\nline endings\rold mac\r\n",
}


def corpus(directory: Path, copies: int = 40) -> Path:
    """The documents above, each repeated with numbers that vary, as a folder of files."""
    rng = random.Random(0)
    directory.mkdir(parents=True)
    for name, text in DOCS.items():
        body = "".join(text.replace("1,234,567", f"{rng.randrange(10**7):,}")
                       for _ in range(copies))
        (directory / name).write_bytes(body.encode("utf-8"))
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus folder, tokenizer dir) trained once at vocab_size 400."""
    root = tmp_path_factory.mktemp("bpe")
    docs = corpus(root / "docs")
    assert main(["tokenizer", "train", str(docs), "--vocab_size=400",
                 f"--out={root / 'tok'}"]) == 0
    return docs, root / "tok"


def cleaned_documents(docs: Path) -> list[str]:
    """Each file as prepare cleans it (BOM dropped, \\r\\n and \\r made \\n)."""
    return [Cleaner().document(p.read_bytes().decode("utf-8")) for p in sorted(docs.iterdir())]


# ---------------------------------------------------------------------------- training, files

def test_training_writes_a_tokenizer_dir_with_the_vocabulary_asked_for(trained):
    _, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["folio_tokenizer.json", "tokenizer.json"]
    info = json.loads((out / "folio_tokenizer.json").read_text())
    assert info["vocab_size"] == 400 and info["pattern"] == bpe_files.GPT4_PATTERN
    assert list(info["special_tokens"]) == list(bpe_files.SPECIAL_TOKENS)
    assert info["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()
                                                      ).hexdigest()
    tok = BPETokenizer(str(out))
    assert tok.vocab_size == 400 and tok.eot_id == 395  # the special tokens come last
    assert tok.spec() == {"kind": "bpe", "path": str(out.resolve()),
                          "sha256": info["tokenizer_sha256"], "vocab_size": 400}


def test_every_document_round_trips_exactly(trained):
    docs, out = trained
    tok = BPETokenizer(str(out))
    for text in cleaned_documents(docs):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert len(ids) < len(text.encode("utf-8")) / 1.5  # the merges compress it
        assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))
    # any other text too, byte by byte: unseen scripts, lone combining marks, control bytes
    rng = random.Random(1)
    for _ in range(50):
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD800),
                                       rng.randrange(0xE000, 0x110000), rng.randrange(0, 32)]))
                       for _ in range(rng.randrange(1, 40)))
        assert tok.decode(tok.encode(text)) == text


def test_every_byte_is_a_token_and_special_tokens_weigh_nothing(trained):
    tok = BPETokenizer(str(trained[1]))
    assert [tok.decode_bytes([b]) for b in range(256)] == [bytes([b]) for b in range(256)]
    lengths = tok.token_bytes()
    assert lengths[:256].tolist() == [1] * 256
    assert lengths[395:].tolist() == [0] * 5 and (lengths[256:395] >= 2).all()
    assert tok.encode("<|endoftext|>") != [tok.eot_id]  # in text it is ordinary text


def test_hugging_face_tokenizers_reads_the_same_ids_from_tokenizer_json(trained):
    docs, out = trained
    ours, theirs = BPETokenizer(str(out)), HFTokenizer(str(out))
    for text in cleaned_documents(docs):
        assert theirs.encode(text) == ours.encode(text)
    assert theirs.eot_id == ours.eot_id and theirs.vocab_size == ours.vocab_size


def test_merges_from_ranks_are_gpt2s_own_merges():
    """tokenizer.json's merges are derived from the ranks; for GPT-2 they are vocab.bpe's."""
    enc = gpt2_encoding()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(50256)}
    alphabet = bpe_files.byte_to_char()
    derived = [" ".join("".join(alphabet[b] for b in part) for part in pair)
               for pair in bpe_files.merges(ranks)]
    assert derived == gpt2_vocab_file("vocab.bpe").decode().split("\n")[1:-1]


def test_invalid_utf8_is_refused_as_prepare_refuses_it_and_nothing_is_written(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("ab日c".encode() + b"\xffd")
    assert main(["tokenizer", "train", str(bad), f"--out={tmp_path / 'tok'}"]) == 2
    assert main(["prepare", str(bad), f"--data_dir={tmp_path / 'data'}"]) == 2
    train_err, prepare_err = capsys.readouterr().err.strip().splitlines()
    assert train_err == prepare_err == (f"folio: error: {bad} is not UTF-8 text: invalid byte "
                                        "at offset 6; convert it to UTF-8 (e.g. iconv -t UTF-8)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, message", [
    (["--vocab_size=260"], f"vocab_size=260 is too small; expected >= {MIN_BPE_VOCAB}"),
    ([f"--vocab_size={2**32 + 1}"], "vocab_size=4294967297 is too large; expected <= 4294967296"),
    (["--vocab_size=5000"], "is too small for vocab_size=5,000"),
    (["--pattern=gpt5"], "pattern='gpt5' is not allowed"),
])
def test_bad_training_input_is_one_line_and_writes_nothing(args, message, tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text("a small text, far too small for five thousand tokens. " * 3)
    assert main(["tokenizer", "train", str(text), f"--out={tmp_path / 'tok'}", *args]) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]


def test_min_vocab_is_the_bytes_and_the_special_tokens():
    assert MIN_BPE_VOCAB == 256 + len(bpe_files.SPECIAL_TOKENS)


def test_out_dir_is_replaced_only_when_it_holds_a_tokenizer_and_overwrite_is_asked(
        trained, tmp_path, capsys):
    docs, _ = trained
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["tokenizer", "train", str(docs), "--vocab_size=300", f"--out={other}",
                 "--overwrite=True"]) == 2
    assert "a directory with other files in it" in capsys.readouterr().err
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(docs), "--vocab_size=300", f"--out={out}"]) == 0
    assert main(["tokenizer", "train", str(docs), "--vocab_size=320", f"--out={out}"]) == 2
    assert "holds a tokenizer already; pass --overwrite=True" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(docs), "--vocab_size=320", f"--out={out}",
                 "--overwrite=True"]) == 0
    assert BPETokenizer(str(out)).vocab_size == 320 and (other / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "tok"]  # no temp dirs left


def test_a_missing_damaged_or_changed_tokenizer_dir_is_one_line(trained, tmp_path):
    _, out = trained
    with pytest.raises(DataError, match="does not exist; train one with `folio tokenizer"):
        BPETokenizer(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="is not a tokenizer dir of `folio tokenizer train`"):
        BPETokenizer(str(tmp_path))
    spec = BPETokenizer(str(out)).spec()
    with pytest.raises(DataError, match="is not the one this dataset or run was made with"):
        tokenizer_from_spec({**spec, "sha256": "0" * 64})
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("folio_tokenizer.json", "tokenizer.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    (copy / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes()
                                          .replace(b'"ignore_merges": true', b'"x": 1'))
    with pytest.raises(DataError, match="does not match folio_tokenizer.json"):
        BPETokenizer(str(copy))


@pytest.mark.parametrize("tokenizer, message", [
    ("TMP/nope", "tokenizer dir TMP/nope does not exist"),
    ("bpe", "tokenizer='bpe' is not allowed"),
])
def test_prepare_with_a_bad_tokenizer_dir_is_one_line(tokenizer, message, trained, tmp_path,
                                                      capsys):
    docs, _ = trained
    args = ["prepare", str(docs), f"--tokenizer={tokenizer.replace('TMP', str(tmp_path))}",
            f"--data_dir={tmp_path / 'data'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message.replace("TMP", str(tmp_path)) in err and err.count("\n") == 1
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------- using it

def test_prepare_train_and_sample_with_a_trained_tokenizer(trained, tmp_path, capsys):
    docs, out = trained
    data = tmp_path / "data"
    assert main(["prepare", str(docs), f"--tokenizer={out}", "--name=docs",
                 f"--data_dir={data}"]) == 0
    meta = json.loads((data / "docs" / "meta.json").read_text())
    tok = BPETokenizer(str(out))
    assert meta["tokenizer"] == tok.spec() and meta["vocab_size"] == 400
    text = "\n\n".join(cleaned_documents(docs))
    split = int(len(text) * 0.9)
    train = np.fromfile(data / "docs" / "train.bin", dtype=meta["dtype"]).tolist()
    assert train == tok.encode(text[:split])
    run = tmp_path / "run"
    assert main(["train", "--dataset=docs", f"--data_dir={data}", f"--out_dir={run}",
                 "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32",
                 "--batch_size=4", "--max_iters=4", "--eval_interval=4", "--eval_iters=2",
                 "--device=cpu", "--compile=False", "--dtype=float32", "--warmup_iters=1"]) == 0
    assert read_run_info(run).tokenizer == tok.spec()
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals[-1]["val_bpb"] > 0
    capsys.readouterr()
    assert main(["sample", str(run), "--start=def f(x", "--max_new_tokens=20",
                 "--num_samples=1", "--device=cpu", "--seed=3"]) == 0
    sample = capsys.readouterr().out
    assert sample.startswith("def f(x") and len(sample) > len("def f(x")
    # exported, its tokenizer loads in transformers and gives the same ids
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok.encode(text[:2000]) == tok.encode(text[:2000])
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.eot_id


def test_tokenizer_eval_compares_bytes_per_token_with_gpt2_and_characters(trained, capsys):
    docs, out = trained
    from folio.config import TokenizerEvalConfig
    from folio.data.tokenizer import GPT2Tokenizer
    from folio.data.tokenizer_eval import evaluate_tokenizer

    rows = evaluate_tokenizer(TokenizerEvalConfig(tokenizer_dir=str(out), source=str(docs)))
    text = "\n\n".join(cleaned_documents(docs))
    n_bytes = len(text.encode("utf-8"))
    assert [(r.tokens, r.bytes) for r in rows] == [
        (len(BPETokenizer(str(out)).encode(text)), n_bytes),
        (len(GPT2Tokenizer().encode(text)), n_bytes), (len(text), n_bytes)]
    assert rows[2].vocab_size == len(set(text))
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"text: {docs.resolve()} ({n_bytes:,} bytes, {len(text):,} characters)"
    assert table[2].startswith(str(out)) and table[2].endswith("%")
    assert table[3].split()[:2] == ["gpt2", "50,257"]


def test_folio_tokenizer_alone_names_its_subcommands(capsys):
    assert main(["tokenizer"]) == 2
    assert "needs a subcommand: train or eval" in capsys.readouterr().err
    assert main(["tokenizer", "eval", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: folio tokenizer eval DIR SOURCE")


# ---------------------------------------------------------------------------- folders

def test_a_folder_is_read_whole_binary_and_hidden_files_left_out(tmp_path, capsys):
    notes = tmp_path / "notes"
    for name, content in {"a.md": b"# notes\n", "b.py": b"print('hi')\n",
                          "c.txt": "caf\u00e9\n".encode(), "logo.png": b"\x89PNG\r\n\x1a\n\0\0",
                          "latin1.csv": "caf\u00e9".encode("latin-1"), "sub/d.rst": b"deep\n",
                          ".git/config": b"[core]\n", ".hidden.md": b"secret\n",
                          "build/out.md": b"generated\n"}.items():
        (notes / name).parent.mkdir(parents=True, exist_ok=True)
        (notes / name).write_bytes(content)
    data = tmp_path / "data"
    assert main(["prepare", str(notes), f"--data_dir={data}", "--exclude=build/*"]) == 0
    out = capsys.readouterr().out
    assert f"skipped 2 binary file(s) of {notes.resolve()} (latin1.csv, logo.png)" in out
    meta = json.loads((data / "notes" / "meta.json").read_text())
    assert (meta["files"], meta["skipped_binary_files"]) == (4, 2)
    chars = meta["tokenizer"]["chars"]
    ids = np.concatenate([np.fromfile(data / "notes" / f"{s}.bin", dtype=meta["dtype"])
                          for s in ("train", "val")])
    assert "".join(chars[i] for i in ids) == "\n\n".join(
        ["# notes\n", "print('hi')\n", "café\n", "deep\n"])
    assert main(["prepare", str(notes), f"--data_dir={data}", "--name=md", "--include=*.md",
                 "--include=*.rst"]) == 0
    meta = json.loads((data / "md" / "meta.json").read_text())
    assert meta["files"] == 3 and meta["skipped_binary_files"] == 0  # a.md, build/out.md, d.rst


def test_a_hub_dataset_trains_on_its_train_documents_and_prepares_with_end_of_text(tmp_path):
    hub = tmp_path / "corpus"
    hub.mkdir()
    docs = [text * 3 for text in DOCS.values()] * 6
    (hub / "data.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", f"hf:{hub}", "--text_field=content", "--vocab_size=300",
                 f"--out={out}"]) == 0
    info = json.loads((out / "folio_tokenizer.json").read_text())
    assert info["source"] == f"hf:{hub}[train]" and info["settings"]["text_field"] == "content"
    assert main(["prepare", f"hf:{hub}", "--text_field=content", f"--tokenizer={out}",
                 f"--data_dir={tmp_path / 'data'}"]) == 0
    meta = json.loads((tmp_path / "data" / "corpus" / "meta.json").read_text())
    tok = BPETokenizer(str(out))
    ids = np.concatenate([np.fromfile(tmp_path / "data" / "corpus" / f"{s}.bin",
                                      dtype=meta["dtype"]) for s in ("train", "val")])
    assert (ids == tok.eot_id).sum() == meta["documents"] == len(docs)
