"""Shared fixtures: an offline download cache seeded with tiny Shakespeare, tiny runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from folio.data.prepare import SHAKESPEARE_SHA256

REPO = Path(__file__).resolve().parents[1]
# Tiny Shakespeare (public domain) ships with the tests, so a fresh clone runs every test.
SHAKESPEARE_TEXT = REPO / "tests" / "data" / "tinyshakespeare" / "input.txt"

# Tests use few threads so helpers and CI runners do not oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test writes the user's cache (downloads, measured autotune choices): a fresh one per
# session, holding tiny Shakespeare as a user's first download leaves it.
if "FOLIO_CACHE" not in os.environ:
    os.environ["FOLIO_CACHE"] = tempfile.mkdtemp(prefix="folio-test-cache-")
    (Path(os.environ["FOLIO_CACHE"]) / "tinyshakespeare").mkdir()
    shutil.copy(SHAKESPEARE_TEXT, Path(os.environ["FOLIO_CACHE"]) / "tinyshakespeare")


def devices() -> list[str]:
    """The devices tests of device-specific paths run on: the CPU (CI has no other), and a GPU
    where this machine has one (scripts/gpu_check.sh runs those). Imported here, not at the
    top: torch must start after OMP_NUM_THREADS is set above (a run in this process and one in
    a subprocess must sum in one order: test_crash_safety compares their losses bitwise)."""
    from folio.machine.device import available_devices
    return [d for d in available_devices() if ":" not in d]


@pytest.fixture(scope="session")
def seeded_cache(tmp_path_factory) -> Path:
    """A FOLIO_CACHE directory holding tiny Shakespeare, as a user's first download leaves it."""
    digest = hashlib.sha256(SHAKESPEARE_TEXT.read_bytes()).hexdigest()
    assert digest == SHAKESPEARE_SHA256, f"{SHAKESPEARE_TEXT} is not tiny Shakespeare"
    cache = tmp_path_factory.mktemp("folio-cache")
    (cache / "tinyshakespeare").mkdir()
    shutil.copy(SHAKESPEARE_TEXT, cache / "tinyshakespeare" / "input.txt")
    return cache


@pytest.fixture
def shakespeare_cache(seeded_cache, monkeypatch) -> Path:
    monkeypatch.setenv("FOLIO_CACHE", str(seeded_cache))
    return seeded_cache


@pytest.fixture(scope="session")
def char_data_dir(seeded_cache, tmp_path_factory) -> Path:
    """A data dir with tiny Shakespeare prepared at the character level (shared, read-only)."""
    from folio.config import PrepareConfig
    from folio.data.prepare import prepare

    data_dir = tmp_path_factory.mktemp("data")
    old = os.environ.get("FOLIO_CACHE")
    os.environ["FOLIO_CACHE"] = str(seeded_cache)
    try:
        prepare(PrepareConfig(dataset="shakespeare_char", data_dir=str(data_dir)))
    finally:
        if old is None:
            del os.environ["FOLIO_CACHE"]
        else:
            os.environ["FOLIO_CACHE"] = old
    return data_dir


TINY = ["--dataset=shakespeare_char", "--n_layer=2", "--n_head=2", "--n_embd=32",
        "--block_size=32", "--batch_size=8", "--device=cpu", "--compile=False", "--dtype=float32",
        "--eval_iters=2", "--log_interval=5", "--warmup_iters=5", "--learning_rate=1e-3",
        "--beta2=0.99", "--min_lr=1e-4", "--always_save_checkpoint=False"]


def tiny_args(data_dir: Path, out_dir: Path, **settings) -> list[str]:
    """Command-line settings for a tiny, fast char model on tiny Shakespeare (without the
    report card at the end unless `report=True`: tests/test_report.py tests it)."""
    settings.setdefault("report", False)
    args = [*TINY, f"--data_dir={data_dir}", f"--out_dir={out_dir}"]
    return args + [f"--{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="session")
def tiny_run(char_data_dir, tmp_path_factory) -> Path:
    """A run dir trained for 40 iterations (shared by tests that only read it)."""
    from folio.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *tiny_args(char_data_dir, out, max_iters=40, eval_interval=20,
                                     lr_decay_iters=40)]) == 0
    return out


def copy_run(run: Path, dest: Path, **config) -> Path:
    """A copy of `run` at `dest`, its run.json's config changed by `config`."""
    shutil.copytree(run, dest)
    if config:
        info = json.loads((dest / "run.json").read_text())
        info["config"].update(config)
        (dest / "run.json").write_text(json.dumps(info))
    return dest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip must say why, and a missing dependency is a failure, not a skip: the test
    environment (requirements.txt) has every package the suite uses."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ").strip()
        if reason in ("", "unconditional skip") or reason.startswith("could not import"):
            report.outcome = "failed"
            report.longrepr = f"skipped without a stated reason ({reason or 'none given'})"
