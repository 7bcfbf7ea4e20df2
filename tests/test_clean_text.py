"""Clean text: a byte-order mark and Windows line endings never reach the vocabulary."""

from __future__ import annotations

import json

import pytest

from folio.cli import main
from folio.data.clean import Cleaner, decode_utf8
from folio.data.tokenizer import load_tokenizer
from folio.errors import DataError

NOTES = "\ufeff" + "Meeting notes\r\nAlice: hello\r\nBob: hi there\r\n\r\nDone.\r\n" * 5


def prepare(capsys, *args) -> tuple[int, str, str]:
    code = main(["prepare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_notes_with_bom_and_crlf_give_a_clean_char_vocabulary(tmp_path, capsys):
    """The issue's case: UTF-8 with a byte-order mark and Windows line endings."""
    path = tmp_path / "notes.txt"
    path.write_bytes(NOTES.encode("utf-8"))
    code, out, _ = prepare(capsys, path, f"--data_dir={tmp_path / 'data'}")
    assert code == 0
    meta = json.loads((tmp_path / "data" / "notes" / "meta.json").read_text("utf-8"))
    chars = meta["tokenizer"]["chars"]
    assert "\r" not in chars and "\ufeff" not in chars
    assert all(c == "\n" or c.isprintable() for c in chars)
    clean = NOTES.replace("\ufeff", "", 1).replace("\r\n", "\n")
    assert meta["characters"] == len(clean)
    assert meta["normalised"] == {"bom": 1, "crlf": NOTES.count("\r\n"), "cr": 0}
    assert meta["keep_newlines"] is False
    assert "byte-order mark(s) removed" in out


def test_keep_newlines_keeps_the_raw_line_endings(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"one\r\ntwo\rthree\n" * 4)
    assert prepare(capsys, path, "--keep_newlines", f"--data_dir={tmp_path}")[0] == 0
    meta = json.loads((tmp_path / "notes" / "meta.json").read_text("utf-8"))
    assert "\r" in meta["tokenizer"]["chars"] and meta["keep_newlines"] is True
    assert meta["normalised"] == {"bom": 0, "crlf": 0, "cr": 0}


def test_every_file_of_a_directory_loses_its_bom(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_bytes("\ufeffFirst file\r\n".encode())
    (docs / "b.txt").write_bytes("\ufeffSecond\rfile".encode())
    (docs / "c.jsonl").write_bytes(json.dumps({"text": "\ufeffThird\r\n"}).encode() + b"\n")
    assert prepare(capsys, docs, "--name=d", "--val_fraction=0.3",
                   f"--data_dir={tmp_path}")[0] == 0
    tok = load_tokenizer(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text("utf-8"))
    assert "\ufeff" not in tok.chars and "\r" not in tok.chars
    assert meta["normalised"] == {"bom": 3, "crlf": 2, "cr": 1}
    assert meta["documents"] == 3


@pytest.mark.parametrize("cut", range(1, 12))
def test_crlf_split_between_pieces_is_one_newline(cut):
    text = "\ufeffab\r\ncd\r\r\nef\r"
    cleaner = Cleaner()
    assert "".join(cleaner.pieces([text[:cut], text[cut:]])) == "ab\ncd\n\nef\n"
    assert cleaner.counts == {"bom": 1, "crlf": 2, "cr": 2}


def test_invalid_utf8_names_the_file_and_byte_offset():
    blocks = [b"ok ", "日".encode()[:2], "日".encode()[2:] + b" fine \xfe tail"]
    with pytest.raises(DataError, match=r"notes.txt is not UTF-8 text: invalid byte at offset 12"):
        list(decode_utf8(iter(blocks), "notes.txt"))


def test_invalid_utf8_in_a_gzipped_jsonl_is_refused_with_its_line(tmp_path, capsys):
    import gzip

    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "fine"}\n{"text": "caf\xe9"}\n'))
    code, _, err = prepare(capsys, path, f"--data_dir={tmp_path / 'data'}")
    assert code == 2
    assert "c.jsonl.gz line 2 is not UTF-8: invalid byte at offset 30 (decompressed)" in err
    assert not (tmp_path / "data").exists()
