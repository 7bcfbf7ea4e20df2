"""The folio run directory: which files it holds, what each means, and how each is read and written.

Layout of a run dir (docs/run-format.md describes each file):
  run.json            what the run is and where it stands (`RunInfo`, one schema for every writer)
  model.safetensors   best weights so far (what `sample` and `export` load)
  resume.safetensors  latest weights + optimizer + RNG + loader state, one file, no pickle
  metrics.jsonl       one JSON object per log line and per eval (folio.watch.metrics)
  .lock               held by the training process (folio.store.guard)
Every write is atomic; nothing here unpickles: safetensors for tensors, JSON for the rest.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from folio import __version__
from folio.errors import CheckpointError
from folio.fsutil import atomic_write_json, atomic_write_with
from folio.store.weights import model_state

RUN_INFO = "run.json"
MODEL_FILE = "model.safetensors"
RESUME_FILE = "resume.safetensors"
NANOGPT_CKPT = "ckpt.pt"  # a nanoGPT out dir's checkpoint
RUN_FORMAT_VERSION = 2  # 1: before RunInfo (keys differed between training and import)
RESUME_FORMAT_VERSION = 1


def is_nanogpt_dir(path: str | Path) -> bool:
    """True for a nanoGPT out dir: a ckpt.pt and no folio run.json."""
    path = Path(path)
    return (path / NANOGPT_CKPT).is_file() and not (path / RUN_INFO).exists()


def has_weights(run_dir: Path) -> bool:
    """Whether the run dir holds saved weights (what a fresh run would destroy)."""
    return (run_dir / MODEL_FILE).is_file() or (run_dir / RESUME_FILE).is_file()


# ---------------------------------------------------------------------------- weights

def save_model_weights(path: Path, model: torch.nn.Module | dict[str, torch.Tensor],
                       metadata: dict[str, Any]) -> None:
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    atomic_write_with(path, lambda tmp: save_file(model_state(model), tmp, metadata=meta))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON-decoded metadata; a corrupt file is a one-line error."""
    try:
        with safe_open(path, framework="pt") as f:  # one read: tensors and metadata
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); delete it or use "
                              "another run dir") from None
    return tensors, {k: json.loads(v) for k, v in raw.items()}


def read_model_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """(tensors, file) of the weights to sample from: the best ones, else the latest."""
    if (run_dir / MODEL_FILE).is_file():
        tensors, _ = read_safetensors(run_dir / MODEL_FILE)
        return tensors, run_dir / MODEL_FILE
    if (run_dir / RESUME_FILE).is_file():
        return load_resume(run_dir).model, run_dir / RESUME_FILE
    raise CheckpointError(f"{run_dir} has no {MODEL_FILE}; training has not saved weights "
                          "yet (wait for the first eval or resume the run)")


# ---------------------------------------------------------------------------- optimizer state

def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and plain JSON."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------- resume state

@dataclass
class ResumeState:
    """Everything a resumed run needs to continue exactly where it stopped."""

    iter_num: int
    best_val_loss: float
    model: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    loader: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # scaler state, config, ...


def save_resume(run_dir: Path, state: ResumeState) -> None:
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    optim_tensors, optim_meta = flatten_optimizer(state.optimizer)
    tensors.update(optim_tensors)
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    tensors.update({f"loader.{k}": v for k, v in state.loader.items()})
    meta = {"format_version": RESUME_FORMAT_VERSION, "iter_num": state.iter_num,
            "best_val_loss": state.best_val_loss, "optimizer": optim_meta, **state.extra}
    raw_meta = {k: json.dumps(v) for k, v in meta.items()}
    atomic_write_with(run_dir / RESUME_FILE, lambda tmp: save_file(tensors, tmp, raw_meta))


def load_resume(run_dir: Path) -> ResumeState:
    path = run_dir / RESUME_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: nothing to resume; train with "
                              "--init_from=scratch first")
    tensors, meta = read_safetensors(path)

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    extra = {k: v for k, v in meta.items()
             if k not in ("iter_num", "best_val_loss", "optimizer", "format_version")}
    return ResumeState(iter_num=meta["iter_num"], best_val_loss=meta["best_val_loss"],
                       model=section("model."),
                       optimizer=unflatten_optimizer(tensors, meta["optimizer"]),
                       rng=section("rng."), loader=section("loader."), extra=extra)


def capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


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
    config: dict[str, Any] = field(default_factory=dict)
    """Every TrainConfig setting, resolved (for an import: nanoGPT's, mapped onto folio's)."""
    dataset: str | None = None
    """Name of the prepared dataset trained on (None when unknown)."""
    iter_num: int = 0
    """Iterations done at the last save."""
    best_val_loss: float | None = None
    """Lowest validation loss so far (the loss of model.safetensors); None before any eval."""
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
    device: str | None = None
    """The device that wrote the run (cuda:0, mps, cpu)."""
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
    versions = {"folio": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
                "python": platform.python_version(), "platform": platform.platform(),
                "device": str(device)}
    if device.type == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(device)
    return {"device": str(device), "versions": versions, "git": git_hash()}


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
    try:
        return RunInfo.from_json(data, path)
    except TypeError as e:
        raise CheckpointError(f"{path} has a malformed entry ({e})") from None
