"""Hugging Face datasets as sources: `openwebtext` (nanoGPT's recipe), `fineweb-edu` and any
`hf:NAME[:CONFIG]` (a hub name or a local directory of parquet/json files), loaded through the
`datasets` library (pip install 'folio[datasets]').

The train/val split is nanoGPT's: `train_test_split(test_size, seed=2357, shuffle=True)` with
its 'test' part as val. `datasets` runs in a short-lived child process that loads (downloading
and converting the first time) and splits, and hands back where each split's rows are: the
Arrow cache files and the row order. This process then reads the memory-mapped files with
pyarrow alone: importing `datasets` (pandas, fsspec, the hub client, ...) would add ~85 MB
here for the whole prepare.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from folio.data.mapped_pages import MappedFiles
from folio.errors import DataError
from folio.extras import need

SPLIT_SEED = 2357  # nanoGPT's data/openwebtext/prepare.py
BATCH_ROWS = 100  # rows read between releases of the cache's mapped pages: a row read in
# shuffled order maps ~0.4 MB of the Arrow cache here (whole page-cache folios), so 1,000-row
# batches held ~155 MB of it at a time; 100 rows hold ~40 MB and read 80,000 rows/s
# pyarrow's allocator (mimalloc) returns freed memory at once, not after a delay: converting
# 500 MB of parquet to the Arrow cache then peaks at ~290 MB instead of ~430 (+10% time)
CHILD_ENV = {"MIMALLOC_PURGE_DELAY": "0"}


@dataclass(frozen=True)
class Recipe:
    """A named hub dataset: where it lives and how nanoGPT / the speedruns split it."""

    path: str
    config: str | None
    val_fraction: float
    download: str  # what the first run fetches, for the offline message


RECIPES = {
    "openwebtext": Recipe("openwebtext", None, 0.0005, "about 55 GB"),
    "fineweb-edu": Recipe("HuggingFaceFW/fineweb-edu", "sample-10BT", 0.0005,
                          "about 30 GB for sample-10BT"),
}
FINEWEB_SAMPLES = ("10B", "100B", "350B")


@dataclass(frozen=True)
class SplitRows:
    """Where a split's documents are: Arrow stream files whose tables, concatenated, hold the
    texts, and a .npy of the row numbers the split takes from them, in order."""

    files: tuple[str, ...]
    order: str
    rows: int


@dataclass
class HubSource:
    """One split of a `datasets` dataset, divided into train and val documents."""

    path: str
    config: str | None
    split: str
    text_field: str
    val_fraction: float
    download: str = "its size depends on the dataset"

    @property
    def label(self) -> str:
        return f"hf:{self.path}" + (f":{self.config}" if self.config else "") + f"[{self.split}]"

    def load(self) -> None:
        """Download (first time) or open the cached dataset and split it as nanoGPT does, in
        a child process (see the module docstring); its errors arrive here as FolioErrors."""
        orders = tempfile.TemporaryDirectory(prefix="folio-split-")  # removed with self
        # an executor, not a Pool: leaving it waits for the child (no leaked semaphores on errors)
        with _environment(CHILD_ENV), ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")) as child:
            splits, self._fingerprint, self._nbytes = child.submit(
                # a copy of the fields only: the child needs no temp dir or earlier splits
                _load_and_split, dataclasses.replace(self), orders.name).result()
        self._orders = orders
        self.splits = {name: SplitRows(**rows) for name, rows in splits.items()}

    def documents(self, split: str, start: int = 0) -> Iterator[str]:
        """The split's texts from row `start` on. After each batch, the Arrow files' pages this
        process has touched are released (mapped_pages.py): reading a shuffled split touches
        the whole file, which would otherwise all count as resident."""
        import numpy as np
        pa = need("pyarrow", "datasets", f"reading {self.label}")

        where = self.splits[split]
        order = np.load(where.order, mmap_mode="r")[start:]
        tables = [pa.ipc.open_stream(pa.memory_map(f)).read_all() for f in where.files]
        texts = [c for t in tables for c in t.column(self.text_field).chunks]  # record batches
        first = np.cumsum([0] + [len(c) for c in texts])  # each batch's first row
        # the mappings `order` and `tables` hold, alive until this returns
        cache = MappedFiles([*where.files, where.order])
        cache.read_randomly()  # rows come from all over the files
        for b in range(0, len(order), BATCH_ROWS):
            rows = np.asarray(order[b:b + BATCH_ROWS], dtype=np.int64)
            batches = np.searchsorted(first, rows, side="right") - 1
            for row, k in zip((rows - first[batches]).tolist(), batches.tolist(), strict=True):
                yield texts[k][row].as_py()
            cache.release()

    def num_rows(self, split: str | None = None) -> int:
        return sum(s.rows for name, s in self.splits.items() if split in (None, name))

    def nbytes(self) -> int:
        return self._nbytes

    def fingerprint(self) -> str:
        return self._fingerprint

    def _load_error(self, e: Exception) -> str:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        offline = any(w in f"{type(e).__name__} {first}".lower() for w in
                      ("offline", "connect", "resolve", "network", "timed out", "couldn't reach"))
        if offline or os.environ.get("HF_HUB_OFFLINE") == "1":
            cache = os.environ.get("HF_DATASETS_CACHE", "~/.cache/huggingface/datasets")
            return (f"cannot load {self.label}: not in the datasets cache ({cache}) and the "
                    f"Hugging Face hub cannot be reached; run the same command once with network "
                    f"access to download it ({self.download}), or point HF_DATASETS_CACHE at a "
                    "copy")
        if "scripts are no longer supported" in first:  # e.g. the hub's openwebtext in 2025
            return (f"cannot load {self.label}: its hub repository still uses a loading script, "
                    "which datasets 4+ no longer runs; install `datasets<4` to prepare it, or "
                    "download its data files and pass their directory as --source")
        return (f"cannot load {self.label} ({type(e).__name__}: {first}); check the name, "
                "--split and the config")


def hub_source(dataset: str, source: str, split: str, text_field: str, tokens: str,
               val_fraction: float | None) -> tuple[HubSource, str] | None:
    """(source, default name) for openwebtext, fineweb-edu or hf:NAME[:CONFIG]; else None."""
    if dataset in RECIPES:
        recipe = RECIPES[dataset]
        config = recipe.config
        if tokens:
            size = tokens.removeprefix("sample-").removesuffix("T")  # 10B, 10BT, sample-10BT
            if dataset != "fineweb-edu" or size not in FINEWEB_SAMPLES:
                raise DataError(f"--tokens={tokens} is not a sample of fineweb-edu; use one of "
                                f"{', '.join(FINEWEB_SAMPLES)} with `folio prepare fineweb-edu`")
            config = f"sample-{size}T"
        return HubSource(source or recipe.path, config, split, text_field,
                         val_fraction or recipe.val_fraction, recipe.download), dataset
    if not dataset.startswith("hf:"):
        return None
    if source or tokens:
        raise DataError(f"--source and --tokens do not apply to {dataset}; name the dataset "
                        "and config as hf:NAME[:CONFIG]")
    path, _, config = dataset[3:].partition(":")
    if not path:
        raise DataError(f"{dataset!r} names no dataset; use hf:NAME[:CONFIG], e.g. "
                        "hf:roneneldan/TinyStories")
    name = os.path.basename(path.rstrip("/")) + (f"-{config}" if config else "")
    return HubSource(path, config or None, split, text_field, val_fraction or 0.1), name


def _load_and_split(source: HubSource, orders: str) -> tuple[dict[str, dict], str, int]:
    """In the child: load and split `source`; write each split's row order to `orders`.
    Returns ({split: SplitRows fields}, fingerprint, bytes of text tables)."""
    datasets = _import_datasets()
    try:
        data = datasets.load_dataset(source.path, source.config, split=source.split)
    except Exception as e:  # offline, unknown name, bad split: many exception types
        raise DataError(source._load_error(e)) from None
    if source.text_field not in data.column_names:
        raise DataError(f"{source.label} has no column {source.text_field!r} (columns: "
                        f"{', '.join(data.column_names)}); pass --text_field=NAME")
    if not data.cache_files:
        raise DataError(f"{source.label} was loaded into memory, not into the datasets cache; "
                        "set HF_DATASETS_IN_MEMORY_MAX_SIZE=0 (the default) and try again")
    try:
        parts = data.train_test_split(test_size=source.val_fraction, seed=SPLIT_SEED,
                                      shuffle=True)
    except ValueError as e:  # too few rows for a non-empty train and val
        raise DataError(f"{source.label} has {len(data)} rows: too few to split at "
                        f"val_fraction={source.val_fraction} ({e})") from None
    import numpy as np

    files = tuple(f["filename"] for f in data.cache_files)  # the text tables, in order
    splits = {}
    for name, part in (("train", parts["train"]), ("val", parts["test"])):  # nanoGPT: test
        order = Path(orders) / f"{name}.npy"
        # the split's row numbers in the table (datasets' indices mapping), in split order
        np.save(order, part._indices.column(0).to_numpy())
        splits[name] = {"files": files, "order": str(order), "rows": len(part)}
    fingerprint = "+".join(p._fingerprint for p in (parts["train"], parts["test"]))
    return splits, fingerprint, data.data.nbytes


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """os.environ with `variables` set (for processes started inside), then as it was."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _import_datasets():
    datasets = need("datasets", "datasets", "preparing a Hugging Face dataset")
    datasets.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    return datasets
