"""The run directory: weights, resume state and run metadata, all written atomically.

Layout of a run dir:
  run.json            resolved config, model shape, tokenizer, iteration, versions, device
  model.safetensors   best weights so far (what `sample` and `export` load)
  resume.safetensors  latest weights + optimizer + RNG + loader state, one file, no pickle
  metrics.jsonl       one JSON object per log line and per eval
Nothing here unpickles: safetensors for tensors, JSON for everything else.
"""

from __future__ import annotations

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
from folio.model.gpt import GPT, GPTConfig

FORMAT_VERSION = 1
RUN_INFO = "run.json"
MODEL_FILE = "model.safetensors"
RESUME_FILE = "resume.safetensors"
TIED_KEY = "lm_head.weight"  # same tensor as transformer.wte.weight; stored once


# ---------------------------------------------------------------------------- weights

def model_state(model: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's (or state dict's) tensors, tied head dropped, contiguous on the CPU."""
    state = model if isinstance(model, dict) else model.state_dict()
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k != TIED_KEY}


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


def load_weights_into(model: GPT, tensors: dict[str, torch.Tensor], source: Path) -> None:
    tensors = dict(tensors)
    tensors.setdefault(TIED_KEY, tensors.get("transformer.wte.weight"))
    expected = model.state_dict()
    mismatched = [k for k, v in tensors.items()
                  if k in expected and v is not None and v.shape != expected[k].shape]
    missing = sorted(set(expected) - set(tensors))
    if mismatched or missing:
        what = mismatched[0] if mismatched else missing[0]
        raise CheckpointError(f"{source} does not fit the model in run.json (first mismatch: "
                              f"{what}); the run dir is inconsistent")
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected})


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
    meta = {"format_version": FORMAT_VERSION, "iter_num": state.iter_num,
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

def environment_info(device: torch.device) -> dict[str, Any]:
    """What reproduces a run: library versions, code version, hardware."""
    import numpy
    info = {"folio": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    info = {"format_version": FORMAT_VERSION, **info,
            "files": sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))}
    atomic_write_json(run_dir / RUN_INFO, info)


def read_run_info(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    path = run_dir / RUN_INFO
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir {run_dir} does not exist; train one with `folio train "
                              f"--out_dir={run_dir}`")
    try:
        info = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {run_dir} is not a folio run dir (or its "
                              "training never saved); train first or pass another --out_dir"
                              ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); it cannot be loaded") from None
    for key in ("model", "tokenizer"):
        if not isinstance(info, dict) or not isinstance(info.get(key), dict):
            raise CheckpointError(f"{path} has no {key!r} section; the run dir is incomplete")
    return info


def load_model(run_dir: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[GPT, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, run info) from a folio run dir or a nanoGPT out dir."""
    from folio.data.tokenizer import tokenizer_from_spec
    run_dir = Path(run_dir)
    if not (run_dir / RUN_INFO).exists() and (run_dir / "ckpt.pt").exists():
        from folio.store.nanogpt import read_nanogpt_out_dir
        model, tokenizer, info, _ = read_nanogpt_out_dir(run_dir)
        return model.to(device).eval(), tokenizer, info
    info = read_run_info(run_dir)
    try:
        model = GPT(GPTConfig(**info["model"]))
    except TypeError as e:
        raise CheckpointError(f"{run_dir / RUN_INFO} has a bad model section ({e})") from None
    if (run_dir / MODEL_FILE).is_file():
        tensors, _ = read_safetensors(run_dir / MODEL_FILE)
        source = run_dir / MODEL_FILE
    elif (run_dir / RESUME_FILE).is_file():
        state = load_resume(run_dir)
        tensors, source = state.model, run_dir / RESUME_FILE
    else:
        raise CheckpointError(f"{run_dir} has no {MODEL_FILE}; training has not saved weights "
                              "yet (wait for the first eval or resume the run)")
    load_weights_into(model, tensors, source)
    tokenizer = tokenizer_from_spec(info["tokenizer"])
    return model.to(device).eval(), tokenizer, info
