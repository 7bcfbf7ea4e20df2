"""nanoGPT out dirs (ckpt.pt + meta.pkl) read without executing pickled code, and converted.

ckpt.pt is loaded with torch.load(weights_only=True); meta.pkl with an unpickler that
resolves no Python names at all, so only plain data (dicts, strings, numbers) comes through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from folio import config
from folio.config import ImportNanoGPTConfig, TrainConfig
from folio.errors import CheckpointError, ConfigError
from folio.model.gpt import GPT, GPTConfig
from folio.store import checkpoint, rundir
from folio.store.rundir import NANOGPT_CKPT, RunInfo
from folio.store.weights import WTE_KEY, gpt_from_state, model_state, pad_rows

META = "meta.pkl"
COMPILE_PREFIX = "_orig_mod."  # torch.compile's wrapper prefixes every key with this
PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


# ---------------------------------------------------------------------------- ckpt.pt

def load_ckpt(path: Path) -> dict[str, Any]:
    """nanoGPT's ckpt.pt as tensors and plain data; anything executable is refused."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing {path}: it holds pickled Python objects beyond "
                              f"tensors and plain data ({first[:160]})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({e}); it is "
                              "corrupt or not a nanoGPT ckpt.pt") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) \
            or not isinstance(ckpt.get("model_args"), dict):
        raise CheckpointError(f"{path} is not a nanoGPT checkpoint (no 'model' and "
                              "'model_args' entries)")
    return ckpt


def strip_compile_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items()}


def _number(value: Any, default: float) -> float:
    if torch.is_tensor(value):
        return float(value.item())
    return float(value) if isinstance(value, (int, float)) else default


# ---------------------------------------------------------------------------- meta.pkl

class PlainDataUnpickler(pickle.Unpickler):
    """Admits only what pickle builds without naming a class: dicts, lists, str, numbers."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"global {module}.{name} is not plain data")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not plain data")


def read_meta_pkl(path: str | Path) -> dict[str, Any]:
    """nanoGPT's char meta.pkl: {'vocab_size', 'itos', 'stoi'}; anything but plain data refused."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            meta = PlainDataUnpickler(f).load()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing {path}: {e}; a nanoGPT meta.pkl holds only dicts, "
                              "strings and ints") from None
    except Exception as e:  # a malformed stream can raise almost anything while parsing
        raise CheckpointError(f"refusing {path}: not a readable plain-data pickle "
                              f"({type(e).__name__})") from None
    if not _is_plain(meta) or not isinstance(meta, dict):
        raise CheckpointError(f"refusing {path}: it is not a plain dict")
    itos = meta.get("itos")
    n = len(itos) if isinstance(itos, dict) else 0
    if not n or any(not isinstance(itos.get(i), str) for i in range(n)):
        raise CheckpointError(f"{path} has no character table ('itos' mapping ids 0..N-1 to "
                              "strings); only nanoGPT's char-level meta.pkl is supported")
    if meta.get("vocab_size", n) != n:
        raise CheckpointError(f"{path}: vocab_size {meta['vocab_size']} does not match its "
                              f"{n} characters")
    return meta


def _is_plain(obj: Any, depth: int = 0) -> bool:
    if depth > 20 or not isinstance(obj, PLAIN_TYPES):
        return False
    if isinstance(obj, dict):
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in obj)
    return True


def find_meta(out_dir: Path, dataset: str | None) -> Path | None:
    """meta.pkl beside ckpt.pt, else nanoGPT's data/<dataset>/meta.pkl (cwd, then out_dir/..)."""
    candidates = [out_dir / META]
    if dataset:
        candidates += [Path("data") / dataset / META, out_dir.parent / "data" / dataset / META]
    return next((p for p in candidates if p.is_file()), None)


def tokenizer_for(meta_path: Path | None):
    """Char tokenizer from meta.pkl, else GPT-2 BPE (what nanoGPT's sample.py assumes)."""
    from folio.data.tokenizer import tokenizer_from_spec
    if meta_path is None:
        return tokenizer_from_spec({"kind": "gpt2"})
    itos = read_meta_pkl(meta_path)["itos"]
    chars = [itos[i] for i in range(len(itos))]
    if chars != sorted(chars) or any(len(c) != 1 for c in chars):
        raise CheckpointError(f"{meta_path}: its characters are not single characters in "
                              "sorted order, as nanoGPT's prepare.py writes them; folio cannot "
                              "map its ids")
    return tokenizer_from_spec({"kind": "char", "chars": chars})


# ---------------------------------------------------------------------------- out dir

def read_nanogpt_out_dir(out_dir: str | Path, meta: str | Path | None = None,
                         dataset: str | None = None
                         ) -> tuple[GPT, Any, RunInfo, dict | None]:
    """(model, tokenizer, info, optimizer state) from a nanoGPT out dir.

    info is what run.json would say (source "nanogpt"; config is nanoGPT's own train config,
    imported_from names ckpt.pt and meta.pkl). The optimizer state is nanoGPT's AdamW
    state_dict (groups: dim >= 2 params, then the rest, in named_parameters order, as
    folio.train.optim builds them), its embedding moments zero-padded like the embedding.
    """
    out_dir = Path(out_dir)
    path = out_dir / NANOGPT_CKPT
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {out_dir} is not a nanoGPT out dir")
    ckpt = load_ckpt(path)
    train_config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    dataset = dataset or train_config.get("dataset")
    meta_path = Path(meta) if meta else find_meta(out_dir, dataset)
    if meta and not meta_path.is_file():
        raise CheckpointError(f"meta file {meta_path} not found")
    tokenizer = tokenizer_for(meta_path)
    config = model_config(ckpt["model_args"], tokenizer.vocab_size, path)
    state = strip_compile_prefix(ckpt["model"])
    model = gpt_from_state(config, state, path)
    iter_num = int(_number(ckpt.get("iter_num"), 0))
    best = _number(ckpt.get("best_val_loss"), math.inf)
    info = RunInfo(model=config.to_dict(), n_params=model.num_params(),
                   tokenizer=tokenizer.spec(), config=train_config,
                   dataset=train_config.get("dataset"), iter_num=iter_num,
                   best_val_loss=best if math.isfinite(best) else None, best_iter=iter_num,
                   source="nanogpt", world_size=1,
                   imported_from={"nanogpt": str(path),
                                  "meta": str(meta_path) if meta_path else None})
    optimizer = ckpt.get("optimizer")
    if isinstance(optimizer, dict) and optimizer.get("state") is not None:
        optimizer = pad_optimizer_state(optimizer, state, config.padded_vocab_size, path)
    else:
        optimizer = None
    return model, tokenizer, info, optimizer


def model_config(model_args: dict[str, Any], tokenizer_vocab: int, source: Path) -> GPTConfig:
    """GPTConfig from nanoGPT's model_args; vocab_size becomes the tokenizer's real count
    when the checkpoint's (possibly padded, e.g. 50304) table fits within its padding."""
    try:
        args = {k: model_args[k] for k in ("n_layer", "n_head", "n_embd", "block_size",
                                           "vocab_size")}
    except KeyError as e:
        raise CheckpointError(f"{source}: model_args lacks {e.args[0]!r}") from None
    rows = args["vocab_size"]
    if rows < tokenizer_vocab:
        raise CheckpointError(f"{source}: the model has {rows} tokens but its tokenizer has "
                              f"{tokenizer_vocab}; pass the meta.pkl it was trained with (--meta)")
    if rows <= GPTConfig(vocab_size=tokenizer_vocab).padded_vocab_size:
        args["vocab_size"] = tokenizer_vocab
    return GPTConfig(**args, bias=bool(model_args.get("bias", True)),
                     dropout=float(model_args.get("dropout", 0.0)))


def pad_optimizer_state(optimizer: dict, state: dict[str, torch.Tensor], rows: int,
                        source: Path) -> dict:
    """Zero-pad the AdamW moments of the embedding, the first dim >= 2 parameter."""
    wte = state[WTE_KEY]
    try:
        wte_id = optimizer["param_groups"][0]["params"][0]
        entry = optimizer["state"].get(wte_id, {})
    except (KeyError, IndexError, TypeError, AttributeError):
        raise CheckpointError(f"{source}: optimizer state has an unexpected layout") from None
    for key, value in list(entry.items()):
        if torch.is_tensor(value) and value.shape == wte.shape:
            entry[key] = pad_rows(value, rows, source)
    return optimizer


# ---------------------------------------------------------------------------- resume, import

def resume_state_from_nanogpt(out_dir: str | Path, meta: str | Path | None = None,
                              dataset: str | None = None) -> tuple[checkpoint.ResumeState, RunInfo]:
    """What `init_from=resume` needs from a nanoGPT out dir: (resume state, run info).

    nanoGPT stores no RNG or loader state, so those start fresh.
    """
    model, _, info, optimizer = read_nanogpt_out_dir(out_dir, meta, dataset)
    if optimizer is None:
        raise CheckpointError(f"{Path(out_dir) / NANOGPT_CKPT} has no optimizer state, so it "
                              "cannot be resumed; finetune from its weights after `folio "
                              "import-nanogpt`")
    return _resume_state(model, info, optimizer), info


def _resume_state(model: GPT, info: RunInfo, optimizer: dict) -> checkpoint.ResumeState:
    best = info.best_val_loss if info.best_val_loss is not None else math.inf
    return checkpoint.ResumeState(
        iter_num=info.iter_num, best_val_loss=best, model=model_state(model),
        optimizer=optimizer, best_iter=info.iter_num, evaluated_at=info.iter_num,
        dataset=info.dataset)


def train_config_from_nanogpt(nano: dict[str, Any], model: GPTConfig, run_dir: Path
                              ) -> dict[str, Any]:
    """folio's resolved TrainConfig for a nanoGPT config dict; settings folio rejects (or does
    not have) fall back to folio's defaults."""
    fixed = {**{k: v for k, v in model.to_dict().items() if k != "vocab_size"},
             "out_dir": str(run_dir), "init_from": "resume"}
    cfg = config.apply(TrainConfig, fixed)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in nano.items():
        if key in names and key not in fixed:
            with contextlib.suppress(ConfigError):
                cfg = config.apply(TrainConfig, {key: value}, cfg)
    return dataclasses.asdict(cfg)


def import_nanogpt(out_dir: str | Path, run_dir: str | Path, meta: str | Path | None = None,
                   dataset: str | None = None) -> Path:
    """Write a nanoGPT out dir as a folio run dir (weights, resume state, run.json)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise CheckpointError(f"{run_dir} already exists and is not empty; choose a new folio "
                              "run dir")
    model, _, info, optimizer = read_nanogpt_out_dir(out_dir, meta, dataset)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.save_model_weights(run_dir / rundir.MODEL_FILE, model,
                              {"iter_num": info.iter_num, "val_loss": info.best_val_loss})
    if optimizer is not None:
        checkpoint.save_resume(run_dir, _resume_state(model, info, optimizer))
    folio_config = train_config_from_nanogpt(info.config, model.config, run_dir)
    rundir.write_run_info(run_dir, dataclasses.replace(
        info, config=folio_config, **rundir.provenance(torch.device("cpu"))))
    return run_dir


def import_run(cfg: ImportNanoGPTConfig) -> Path:
    """`folio import-nanogpt`: convert cfg.nanogpt_out_dir into cfg.run_dir and say so."""
    run_dir = import_nanogpt(cfg.nanogpt_out_dir, cfg.run_dir, cfg.meta or None,
                             cfg.dataset or None)
    info = rundir.read_run_info(run_dir)
    print(f"imported {cfg.nanogpt_out_dir} -> {run_dir} (iter {info.iter_num}, "
          f"{info.tokenizer['kind']} tokenizer, files: {', '.join(info.files)})")
    return run_dir
