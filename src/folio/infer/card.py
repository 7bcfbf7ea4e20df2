"""A run's report card with its samples: the fixed prompts sampled at a fixed seed from the
best weights (kept in samples.json until the weights change), then watch/report.py's page.
`folio report` and the end of `folio train` call `write_card`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from folio.errors import FolioError
from folio.infer.sample import generate, load_run
from folio.store.rundir import MODEL_FILE, read_run_info, read_samples, write_samples
from folio.watch.report import check_target, load_cards, write_report

PROMPTS = ("\n", "The ", "Once upon a time, ")  # a prompt the vocabulary cannot spell is skipped
SEED = 1337
MAX_NEW_TOKENS = 64
TEMPERATURE = 0.8
TOP_K = 200
SETTINGS = {"prompts": list(PROMPTS), "seed": SEED, "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": TEMPERATURE, "top_k": TOP_K}  # samples.json made otherwise is redone


def fresh_samples(run_dir: Path) -> dict[str, Any] | None:
    """samples.json when it was sampled, complete, from the weights the run has now."""
    saved = read_samples(run_dir)
    if saved is None or not saved.get("complete"):
        return None
    try:
        info = read_run_info(run_dir)
    except FolioError:
        return None
    same = saved.get("best_iter") == info.best_iter and all(
        saved.get(k) == v for k, v in SETTINGS.items())
    return saved if same else None


def make_samples(run_dir: Path, max_seconds: float | None = None, device: str = "auto"
                 ) -> dict[str, Any]:
    """Sample each prompt (each from the same seed) from the run's best weights, cut short
    when `max_seconds` are spent; written to samples.json."""
    model, tokenizer, info = load_run(run_dir, device)
    started = time.monotonic()
    samples, complete = [], True
    for prompt in PROMPTS:
        try:
            pieces = generate(model, tokenizer, prompt, MAX_NEW_TOKENS, TEMPERATURE, TOP_K,
                              seed=SEED)
        except FolioError:  # the vocabulary cannot spell this prompt
            continue
        text = []
        for piece in pieces:
            text.append(piece)
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                complete = False
                break
        samples.append({"prompt": prompt, "text": "".join(text)})
        if not complete:
            break
    data = {"format_version": 1, "best_iter": info.best_iter, **SETTINGS,
            "complete": complete, "samples": samples}
    write_samples(run_dir, data)
    return data


def ensure_samples(run_dir: Path, max_seconds: float | None = None) -> str | None:
    """Fresh samples in samples.json (sampled now when missing or stale); returns why there
    are none (no weights, say), or None."""
    if fresh_samples(run_dir) is not None:
        return None
    if not (run_dir / MODEL_FILE).is_file():
        return f"no samples: {run_dir} has no {MODEL_FILE} yet"
    try:
        make_samples(run_dir, max_seconds)
    except FolioError as e:
        return f"no samples: {e}"
    return None


def write_card(run_dirs: list[str], out: str = "", x: str = "iter", samples: bool = True,
               max_seconds: float | None = None) -> tuple[Path, list[str]]:
    """Samples for each run dir (when `samples`), then the report; returns its path and the
    notes on runs left without samples. Bad input fails before anything is written."""
    check_target(run_dirs, out)
    load_cards(run_dirs)
    notes = []
    if samples:
        for d in run_dirs:
            note = ensure_samples(Path(d), max_seconds)
            if note:
                notes.append(note)
    return write_report(run_dirs, out, x), notes
