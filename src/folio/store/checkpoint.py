"""The tensor files of a run dir: model.safetensors (the best weights) and resume.safetensors
(everything an exact resume needs). Their names, and run.json, are store/rundir.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from folio.errors import CheckpointError
from folio.fsutil import atomic_write_with
from folio.store.rundir import MODEL_FILE, RESUME_FILE
from folio.store.weights import model_state

RESUME_FORMAT_VERSION = 1


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
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # per rank (machine.distributed)
    loader: dict[str, torch.Tensor] = field(default_factory=dict)  # per rank
    best_iter: int = -1  # iteration of best_val_loss
    best_val_bpb: float | None = None  # val bits per byte at best_iter (None: not measured)
    evaluated_at: int = -1  # iteration whose eval already ran (not repeated after a resume)
    world_size: int = 1  # processes that wrote rng and loader
    scaler: dict[str, Any] = field(default_factory=dict)  # float16 loss scaling (GradScaler)
    dataset: str = ""
    wandb_run_id: str | None = None  # a resumed run logs on to the same wandb run
    time_spent: float = 0.0  # seconds of a --time budget spent (a resume goes on with the rest)


# ResumeState's plain fields, kept as JSON in the safetensors metadata (keys of older files that
# are not among them are ignored; missing ones take their defaults)
_META_FIELDS = ("iter_num", "best_val_loss", "best_iter", "evaluated_at", "world_size", "scaler",
                "dataset", "wandb_run_id", "time_spent", "best_val_bpb")


def save_resume(run_dir: Path, state: ResumeState) -> None:
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    optim_tensors, optim_meta = flatten_optimizer(state.optimizer)
    tensors.update(optim_tensors)
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    tensors.update({f"loader.{k}": v for k, v in state.loader.items()})
    meta = {"format_version": RESUME_FORMAT_VERSION, "optimizer": optim_meta,
            **{name: getattr(state, name) for name in _META_FIELDS}}
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

    return ResumeState(model=section("model."),
                       optimizer=unflatten_optimizer(tensors, meta["optimizer"]),
                       rng=section("rng."), loader=section("loader."),
                       **{name: meta[name] for name in _META_FIELDS if name in meta})


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
