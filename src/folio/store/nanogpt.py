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
from folio.config import TrainConfig
from folio.errors import CheckpointError, ConfigError
from folio.model.gpt import GPT, GPTConfig
from folio.model.noinit import no_init
from folio.store import rundir

CKPT = "ckpt.pt"
META = "meta.pkl"
COMPILE_PREFIX = "_orig_mod."  # torch.compile's wrapper prefixes every key with this
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks, not parameters
TIED_KEY = "lm_head.weight"
WTE_KEY = "transformer.wte.weight"
PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


def is_nanogpt_dir(path: str | Path) -> bool:
    """True for a nanoGPT out dir: a ckpt.pt and no folio run.json."""
    path = Path(path)
    return (path / CKPT).is_file() and not (path / "run.json").exists()


# ---------------------------------------------------------------------------- weights

def gpt_from_state_dict(config: GPTConfig, state: dict[str, torch.Tensor],
                        source: str | Path) -> GPT:
    """A folio GPT holding nanoGPT-named weights; the embedding is zero-padded to the table size.

    The model is built on the meta device and the tensors are assigned, so a large model is
    never randomly initialised only to be overwritten.
    """
    state = {k: v for k, v in state.items() if not k.endswith(BUFFERS) and k != TIED_KEY}
    if WTE_KEY not in state:
        raise CheckpointError(f"{source} has no {WTE_KEY}; it is not a GPT-2/nanoGPT model")
    state[WTE_KEY] = pad_rows(state[WTE_KEY], config.padded_vocab_size, source)
    with torch.device("meta"), no_init():
        model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED_KEY}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k]]
    for problem, keys in (("is missing", missing), ("has unexpected", unexpected),
                          ("has a mis-shaped", wrong)):
        if keys:
            raise CheckpointError(f"{source} {problem} tensor {keys[0]} ({len(keys)} in all) "
                                  "for the model its config describes; the checkpoint does not "
                                  "match its config")
    state = {k: v.float().contiguous() for k, v in state.items()}
    state[TIED_KEY] = state[WTE_KEY]
    model.load_state_dict(state, strict=True, assign=True)
    model.transformer.wte.weight = model.lm_head.weight  # assign=True unties; tie again
    return model


def pad_rows(tensor: torch.Tensor, rows: int, source: str | Path) -> torch.Tensor:
    """Zero-pad dim 0 of tensor (V, ...) to `rows`."""
    if tensor.shape[0] > rows:
        raise CheckpointError(f"{source}: embedding has {tensor.shape[0]} rows, more than the "
                              f"{rows} its vocab_size allows")
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad]) if len(pad) else tensor


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
                         ) -> tuple[GPT, Any, dict[str, Any], dict | None]:
    """(model, tokenizer, info, optimizer state) from a nanoGPT out dir.

    info mirrors run.json: "config" (nanoGPT's train config), "model", "tokenizer",
    "iter_num", "best_val_loss", plus "source" and "meta". The optimizer state is nanoGPT's
    AdamW state_dict (groups: dim >= 2 params, then the rest, in named_parameters order, as
    folio.train.optim builds them), its embedding moments zero-padded like the embedding.
    """
    out_dir = Path(out_dir)
    path = out_dir / CKPT
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
    model = gpt_from_state_dict(config, state, path)
    info = {"format_version": 1, "source": "nanogpt", "ckpt": str(path),
            "meta": str(meta_path) if meta_path else None,
            "config": train_config, "model": config.to_dict(), "tokenizer": tokenizer.spec(),
            "iter_num": int(_number(ckpt.get("iter_num"), 0)),
            "best_val_loss": _number(ckpt.get("best_val_loss"), math.inf)}
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
                              dataset: str | None = None
                              ) -> tuple[rundir.ResumeState, dict[str, Any]]:
    """What `init_from=resume` needs from a nanoGPT out dir: (resume state, run info).

    nanoGPT stores no RNG or loader state, so those start fresh.
    """
    model, _, info, optimizer = read_nanogpt_out_dir(out_dir, meta, dataset)
    if optimizer is None:
        raise CheckpointError(f"{Path(out_dir) / CKPT} has no optimizer state, so it cannot be "
                              "resumed; finetune from its weights after `folio import-nanogpt`")
    iter_num = info["iter_num"]
    state = rundir.ResumeState(
        iter_num=iter_num, best_val_loss=info["best_val_loss"],
        model=rundir.model_state(model), optimizer=optimizer,
        extra={"best_iter": iter_num, "evaluated_at": iter_num,
               "dataset": info["config"].get("dataset")})
    return state, info


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
    model, tokenizer, info, optimizer = read_nanogpt_out_dir(out_dir, meta, dataset)
    run_dir.mkdir(parents=True, exist_ok=True)
    iter_num, best = info["iter_num"], info["best_val_loss"]
    finite_best = best if math.isfinite(best) else None
    rundir.save_model_weights(run_dir / rundir.MODEL_FILE, model,
                                  {"iter_num": iter_num, "val_loss": finite_best})
    if optimizer is not None:
        rundir.save_resume(run_dir, rundir.ResumeState(
            iter_num=iter_num, best_val_loss=best, model=rundir.model_state(model),
            optimizer=optimizer, extra={"best_iter": iter_num, "evaluated_at": iter_num}))
    device = torch.device("cpu")
    rundir.write_run_info(run_dir, {
        "config": train_config_from_nanogpt(info["config"], model.config, run_dir),
        "model": model.config.to_dict(), "tokenizer": tokenizer.spec(),
        "dataset": info["config"].get("dataset"), "iter_num": iter_num,
        "best_val_loss": finite_best, "best_iter": iter_num,
        "imported_from": {"nanogpt": info["ckpt"], "meta": info["meta"]},
        "versions": rundir.environment_info(device), "git": rundir.git_hash(),
        "device": str(device)})
    return run_dir


def import_nanogpt_main(argv: list[str]) -> int:
    """`folio import-nanogpt NANOGPT_OUT_DIR [--meta PATH] [--dataset NAME] FOLIO_RUN_DIR`."""
    from folio.cli import ArgumentParser
    parser = ArgumentParser(prog="folio import-nanogpt",
                            description="Convert a nanoGPT out dir (ckpt.pt, optional char "
                                        "meta.pkl) into a folio run dir. Nothing is unpickled "
                                        "beyond tensors and plain data.")
    parser.add_argument("nanogpt_out_dir", help="nanoGPT out dir holding ckpt.pt")
    parser.add_argument("run_dir", help="folio run dir to create")
    parser.add_argument("--meta", help="char-level meta.pkl (default: beside ckpt.pt, then "
                                       "data/<dataset>/meta.pkl)")
    parser.add_argument("--dataset", help="dataset name for finding meta.pkl (default: from "
                                          "ckpt.pt's config)")
    args = parser.parse_args(argv)
    run_dir = import_nanogpt(args.nanogpt_out_dir, args.run_dir, args.meta, args.dataset)
    info = rundir.read_run_info(run_dir)
    print(f"imported {args.nanogpt_out_dir} -> {run_dir} (iter {info['iter_num']}, "
          f"{info['tokenizer']['kind']} tokenizer, files: {', '.join(info['files'])})")
    return 0
