"""The folio run directory: the name of every file in it, and run.json, its one reader and
writer. Imports no torch, so `folio plot` and the loss.png refresher stay light.

Layout of a run dir (docs/run-format.md describes each file):
  run.json            what the run is and where it stands (`RunInfo`, one schema for every writer)
  model.safetensors   best weights so far (what `sample` and `export` load; store/checkpoint.py)
  resume.safetensors  latest weights + optimizer + RNG + loader state, one file, no pickle
                      (store/checkpoint.py)
  metrics.jsonl       one JSON object per log line and per eval (folio.watch.metrics)
  loss.png            the loss curves, redrawn at every eval (folio.watch.plot)
  evals.jsonl         one JSON object per `folio eval` of the run (folio.train.eval_run)
  samples.json        the report's samples: fixed prompts at a fixed seed (folio.infer.card)
  report.html         the run's report card, and report.md its markdown twin (folio.watch.report)
  .lock               held by the training process (folio.store.guard)
  tensorboard/        TensorBoard events, with --tensorboard=True (wandb writes wandb/ beside it)
Every write is atomic (a hidden `.<name>.*.tmp` file renamed into place); nothing here
unpickles: safetensors for tensors, JSON for the rest.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from folio import __version__
from folio.errors import CheckpointError
from folio.fsutil import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import torch

RUN_INFO = "run.json"
MODEL_FILE = "model.safetensors"
RESUME_FILE = "resume.safetensors"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
LOCK_FILE = ".lock"
EVALS_FILE = "evals.jsonl"
SAMPLES_FILE = "samples.json"
REPORT_FILE = "report.html"
REPORT_MD_FILE = "report.md"
WRITE_PROBE = ".folio-write-test"  # written and removed when a run dir is claimed
TEMP_FILES = ".*.tmp"  # glob of atomic writes a kill left behind (fsutil.atomic_path)
TENSORBOARD_DIR = "tensorboard"
NANOGPT_CKPT = "ckpt.pt"  # a nanoGPT out dir's checkpoint
RUN_FORMAT_VERSION = 2  # 1: before RunInfo (keys differed between training and import)


def is_nanogpt_dir(path: str | Path) -> bool:
    """True for a nanoGPT out dir: a ckpt.pt and no folio run.json."""
    path = Path(path)
    return (path / NANOGPT_CKPT).is_file() and not (path / RUN_INFO).exists()


def has_weights(run_dir: Path) -> bool:
    """Whether the run dir holds saved weights (what a fresh run would destroy)."""
    return (run_dir / MODEL_FILE).is_file() or (run_dir / RESUME_FILE).is_file()


# ---------------------------------------------------------------------------- run.json

@dataclass
class RunInfo:
    """run.json: what a run is and where it stands. Training and `import-nanogpt` write the
    same keys; a file written before this schema (format_version 1) loads with the defaults."""

    model: dict[str, Any]
    """The weights' GPTConfig: n_layer, n_head, n_embd, block_size, vocab_size, dropout, bias."""
    tokenizer: dict[str, Any]
    """The tokenizer spec, as in the dataset's meta.json: {"kind": "char", "chars": [...]} or
    {"kind": "gpt2"}."""
    n_params: int | None = None
    """Non-embedding parameter count, as nanoGPT prints it (`GPT.num_params()`); None in a
    file written before it was recorded."""
    config: dict[str, Any] = field(default_factory=dict)
    """Every TrainConfig setting, resolved (for an import: nanoGPT's, mapped onto folio's)."""
    dataset: str | None = None
    """Name of the prepared dataset trained on (None when unknown)."""
    iter_num: int = 0
    """Iterations done at the last save."""
    best_val_loss: float | None = None
    """Lowest validation loss so far (the loss of model.safetensors); None before any eval."""
    best_val_bpb: float | None = None
    """Validation bits per byte at best_iter (summed loss over the UTF-8 bytes of the
    targets, in bits: compares across tokenizers); None before any eval, or not measured."""
    best_iter: int = -1
    """Iteration of best_val_loss; -1 before any eval."""
    source: str = "train"
    """How the run dir came to be: "train" (folio train) or "nanogpt" (import-nanogpt); when
    read from a source that is not a run dir, "nanogpt" or "hf"."""
    imported_from: dict[str, Any] | None = None
    """For an import: the files read, e.g. {"nanogpt": ckpt.pt path, "meta": meta.pkl path}."""
    dtype: str | None = None
    """Compute dtype of training (float32, bfloat16, float16); None for an import."""
    compile: bool | None = None
    """Whether training ran torch.compile'd; None for an import."""
    world_size: int = 1
    """Training processes (torchrun ranks); 1 for an import."""
    tuning: dict[str, Any] | None = None
    """The CPU fast path measured for the settings left on auto: {"choice", "knobs", "speedup"
    (over eager float32), "cached", "ms_per_step"}; None when nothing was measured."""
    chat_template: dict[str, Any] | None = None
    """The chat template the run was finetuned with (--task=chat; data/chat.py's record:
    name, roles, special tokens, the Jinja form); None for a base model."""
    device: str | None = None
    """The device that wrote the run (cuda:0, mps, cpu)."""
    hardware: dict[str, Any] | None = None
    """The machine that trained: {"cpu", "cpu_flags", "capability", "threads", "gpu"}
    (`hardware`); None for an import or a file written before it was recorded."""
    tokens_per_iter: int | None = None
    """Tokens one optimizer step trains on (all processes, all micro-batches)."""
    flops_per_token: float | None = None
    """Training FLOPs per token (forward and backward), as MFU counts them."""
    peak_flops: float | None = None
    """The device's peak FLOP/s that MFU divides by (None or 0 when unknown)."""
    wall_s: float | None = None
    """Seconds since the training process started (set-up, evaluations and saves included),
    at the last save."""
    versions: dict[str, Any] = field(default_factory=dict)
    """What reproduces it: folio, torch, numpy, python, platform, device (and gpu name)."""
    git: str | None = None
    """Commit of the folio checkout that wrote it, if it ran from one."""
    files: list[str] = field(default_factory=list)
    """Files in the run dir when run.json was written (hidden files left out)."""
    format_version: int = RUN_FORMAT_VERSION
    """Version of this schema: 2 (1: written before the schema; still read)."""

    @classmethod
    def from_json(cls, data: Any, path: Path) -> RunInfo:
        """A RunInfo from run.json's contents (either format version); bad files are one line."""
        for key in ("model", "tokenizer"):
            if not isinstance(data, dict) or not isinstance(data.get(key), dict):
                raise CheckpointError(f"{path} has no {key!r} section; the run dir is incomplete")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
            raise CheckpointError(f"{path} has format_version {version!r}, newer than this "
                                  f"folio reads ({RUN_FORMAT_VERSION}); upgrade folio")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "source" not in data:  # format 1: only an import recorded where it came from
            values["source"] = "nanogpt" if data.get("imported_from") else "train"
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {"format_version": RUN_FORMAT_VERSION,
                **{k: v for k, v in dataclasses.asdict(self).items() if k != "format_version"}}


def provenance(device: torch.device) -> dict[str, Any]:
    """RunInfo's device, versions and git: what reproduces a run."""
    import numpy
    import torch  # here, not at the top: reading run.json must not load torch
    versions = {"folio": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
                "python": platform.python_version(), "platform": platform.platform(),
                "device": str(device)}
    if device.type == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(device)
    return {"device": str(device), "versions": versions, "git": git_hash()}


def hardware(device: torch.device) -> dict[str, Any]:
    """RunInfo's hardware: the CPU (model, the instruction-set flags that choose kernels),
    torch's threads, and the GPU's name on a GPU."""
    import torch

    from folio.speed.autotune import cpu_identity  # measured choices key on the same identity
    cpu = cpu_identity()
    return {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "capability": cpu["capability"],
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_run_info(run_dir: Path, info: RunInfo) -> None:
    names = {p.name for p in run_dir.iterdir() if not p.name.startswith(".")} | {RUN_INFO}
    atomic_write_json(run_dir / RUN_INFO,
                      dataclasses.replace(info, files=sorted(names)).to_json())


def read_run_info(run_dir: str | Path) -> RunInfo:
    """The run dir's run.json; a missing, unreadable or malformed one is a one-line error."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_INFO
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir {run_dir} does not exist; train one with `folio train "
                              f"--out_dir={run_dir}`")
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {run_dir} is not a folio run dir (or its "
                              "training never saved); train first or pass another --out_dir"
                              ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); it cannot be loaded") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror})") from None
    try:
        return RunInfo.from_json(data, path)
    except TypeError as e:
        raise CheckpointError(f"{path} has a malformed entry ({e})") from None


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    """The results `folio eval` recorded in a run dir, oldest first (unreadable lines
    skipped)."""
    path = Path(run_dir) / EVALS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_eval(run_dir: Path, row: dict[str, Any]) -> None:
    """Add one `folio eval` result to the run's evals.jsonl (rewritten atomically)."""
    rows = [*read_evals(run_dir), row]
    atomic_write_text(Path(run_dir) / EVALS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def read_samples(run_dir: Path) -> dict[str, Any] | None:
    """The run's samples.json ({"iter", "seed", "max_new_tokens", "samples": [{"prompt",
    "text"}], "complete"}), or None when missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / SAMPLES_FILE).read_text("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("samples"), list) else None


def write_samples(run_dir: Path, data: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / SAMPLES_FILE, data)
