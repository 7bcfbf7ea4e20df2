"""Hugging Face datasets as sources: `openwebtext` (nanoGPT's recipe), `fineweb-edu` and any
`hf:NAME[:CONFIG]` (a hub name or a local directory of parquet/json files), loaded through the
`datasets` library (pip install 'folio[datasets]').

The train/val split is nanoGPT's: `train_test_split(test_size, seed=2357, shuffle=True)` with
its 'test' part as val. Documents are read in batches from the memory-mapped Arrow cache.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from folio.data.mapped_pages import MappedFiles
from folio.errors import DataError

SPLIT_SEED = 2357  # nanoGPT's data/openwebtext/prepare.py
BATCH_ROWS = 1000
RELEASE_BYTES = 1 << 20  # characters read between releases of the cache's mapped pages
EXTRA = "pip install 'folio[datasets]'"


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
        """Download (first time) or open the cached dataset, then split it as nanoGPT does.

        One process converts the files to the Arrow cache: with num_proc each worker holds
        a few hundred MB, the peak of the whole prepare."""
        datasets = _import_datasets()
        try:
            data = datasets.load_dataset(self.path, self.config, split=self.split)
        except Exception as e:  # offline, unknown name, bad split: many exception types
            raise DataError(self._load_error(e)) from None
        import pyarrow

        pyarrow.default_memory_pool().release_unused()  # what converting to Arrow used
        if self.text_field not in data.column_names:
            raise DataError(f"{self.label} has no column {self.text_field!r} (columns: "
                            f"{', '.join(data.column_names)}); pass --text_field=NAME")
        try:
            parts = data.train_test_split(test_size=self.val_fraction, seed=SPLIT_SEED,
                                          shuffle=True)
        except ValueError as e:  # too few rows for a non-empty train and val
            raise DataError(f"{self.label} has {len(data)} rows: too few to split at "
                            f"val_fraction={self.val_fraction} ({e})") from None
        self.splits = {"train": parts["train"], "val": parts["test"]}  # nanoGPT renames test

    def documents(self, split: str, start: int = 0) -> Iterator[str]:
        """The split's texts from row `start` on. Every RELEASE_BYTES of text read, the Arrow
        cache's pages this process has touched are released (mapped_pages.py): reading a
        shuffled split touches the whole file, which would otherwise all count as resident."""
        rows = self.splits[split]
        if start >= len(rows):  # datasets refuses select(range(n, n)) on n rows
            return
        if start:
            rows = rows.select(range(start, len(rows)))
        cache = MappedFiles(f["filename"] for f in rows.cache_files)
        cache.read_randomly()  # the split is shuffled: rows come from all over the file
        read = 0
        for batch in rows.iter(batch_size=BATCH_ROWS):
            texts = batch[self.text_field]
            read += sum(map(len, texts))
            if read >= RELEASE_BYTES:
                cache.release()
                read = 0
            yield from texts

    def num_rows(self, split: str | None = None) -> int:
        return sum(len(s) for name, s in self.splits.items() if split in (None, name))

    def nbytes(self) -> int:
        return sum(s.data.nbytes for s in self.splits.values())

    def fingerprint(self) -> str:
        return "+".join(s._fingerprint for s in self.splits.values())

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


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(f"Hugging Face datasets need the datasets package; install it with "
                        f"`{EXTRA}`") from None
    datasets.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    return datasets
