"""What `folio train` trains when the user leaves settings out: presets, recipes, and the one
function that resolves the settings before anything runs.

Sources, later ones winning: TrainConfig's defaults (nanoGPT's train.py) < a preset or config
file < the command line. Then `resolve` applies, once, the defaults that depend on what was
given and on the device: a bare `folio train` trains the preset sized for the device, the
modern recipe fills what was not given, and a resumed run takes the model shape it was
trained with. `folio train --print-config` prints the same resolved settings.
"""

from __future__ import annotations

import dataclasses
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from folio.config import AUTO, TrainConfig, apply
from folio.errors import CheckpointError, ConfigError, FolioError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# nanoGPT config file stems that map onto shipped presets.
PRESET_ALIASES = {"train_shakespeare_char": "shakespeare_char", "train_gpt2": "gpt2_124m"}

# Settings that say where and how to run, or where the run lives, rather than what to train:
# giving only these leaves `folio train` bare. init_from counts only as scratch or resume.
PLACE_KEYS = frozenset({"recipe", "device", "dtype", "compile", "backend", "fsdp", "peak_tflops",
                        "data_dir", "out_dir", "init_from", "eval_only", "seed", "wandb_log",
                        "wandb_project", "wandb_run_name", "tensorboard", "overwrite"})
DEVICE_PRESETS = {"cpu": "shakespeare_char_cpu", "cuda": "shakespeare_char",
                  "mps": "shakespeare_char"}  # what a bare `folio train` trains on each device

# --recipe=modern: the modern small-GPT bundle (modded-nanogpt, nanochat), learning rates
# tuned on tiny Shakespeare's train split at the README CPU size (docs/training.md).
MODERN_RECIPE: dict[str, Any] = {
    "rope": True, "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2",
    "zero_init_proj": True, "bias": False, "optimizer": "muon", "muon_lr": 0.02,
    "learning_rate": 0.01, "embed_lr": 0.01, "head_lr": 0.004, "weight_decay": 0.0,
    "lr_schedule": "wsd", "warmdown_frac": 0.5, "warmup_iters": 0, "min_lr": 0.0,
}

# The TrainConfig fields a checkpoint fixes: GPTConfig's fields but the vocabulary (it comes
# from the dataset) and dropout (it may change on resume). Listed, not derived, so that the
# command line never imports the model (torch); a test checks the two agree.
MODEL_SHAPE_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "bias", "rope", "norm",
                    "qk_norm", "mlp", "tie_head", "logit_softcap", "zero_init_proj")


def preset_names() -> list[str]:
    folder = resources.files("folio") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    name = PRESET_ALIASES.get(name, name)
    if name not in preset_names():
        raise ConfigError(f"no preset or config file named {name!r}; presets: "
                          f"{', '.join(preset_names())}")
    text = (resources.files("folio") / "presets" / f"{name}.toml").read_text("utf-8")
    return tomllib.loads(text)


def head_tied(cfg: TrainConfig, vocab_size: int) -> bool:
    """tie_head as the settings decide it. auto: tied (GPT-2) for the nanoGPT recipe; the
    modern recipe unties the head, as in the speedrun and nanochat, unless its weights would
    outnumber all the blocks' (12 n_embd^2 each). Then one shared matrix learns more from
    little data and steps faster: the seed's BPE shape (4 x 64, GPT-2's vocabulary) reached
    train loss 4.27 tied against 4.34 untied after 600 iterations, at 98 against 116 ms a
    step."""
    if cfg.tie_head != AUTO:
        return bool(cfg.tie_head)
    if cfg.recipe != "modern":
        return True
    return vocab_size * cfg.n_embd > 12 * cfg.n_layer * cfg.n_embd**2


def fill(cfg: TrainConfig, values: dict[str, Any], given: frozenset[str]) -> TrainConfig:
    """`values` for the settings that were not given."""
    return apply(TrainConfig, {k: v for k, v in values.items() if k not in given}, cfg)


def resolve(cfg: TrainConfig, given: frozenset[str], device_type: str,
            saved_model: dict[str, Any] | None = None) -> tuple[TrainConfig, str]:
    """The final settings of a run and a note for the log ("" when nothing was filled in).

    `given`: the names of the settings the user set (command line or config file).
    A bare `folio train` (no preset or config file, and no setting beyond PLACE_KEYS) trains
    the tiny-Shakespeare character model sized for the device: nanoGPT README's CPU model on
    a CPU, nanoGPT's GPU char model (`shakespeare_char`) on cuda or mps. Any other setting
    means nanoGPT's train.py defaults for the rest, on every device. `recipe=modern` then
    fills MODERN_RECIPE for every setting not given. A resumed run (`saved_model`: the model
    section of its run.json) takes the shape it was trained with; a different shape that was
    given is a one-line error.
    """
    notes = []
    if not (given - PLACE_KEYS) and cfg.init_from in ("scratch", "resume"):
        name = DEVICE_PRESETS.get(device_type, DEVICE_PRESETS["cpu"])
        preset = load_preset(name)
        cfg = fill(cfg, preset, given)
        given = given | frozenset(preset)
        notes.append(f"no model or training settings given, so on {device_type} folio trains "
                     f"the {name} preset ({cfg.n_layer} layers, {cfg.n_embd} wide, "
                     f"{cfg.max_iters} iters, out_dir {cfg.out_dir}); any such setting, or a "
                     "preset, gives nanoGPT's train.py defaults instead")
    if cfg.recipe == "modern":
        filled = [f"{k}={v}" for k, v in MODERN_RECIPE.items() if k not in given]
        if "tie_head" not in given:
            filled.append("head untied unless it outweighs the blocks")
        notes.append("recipe modern: " + ", ".join(filled))
        cfg = fill(cfg, MODERN_RECIPE, given)
    if cfg.init_from == "resume" and saved_model:
        cfg = resume_shape(cfg, given, saved_model)
    return cfg, "; ".join(notes)


def resume_shape(cfg: TrainConfig, given: frozenset[str], saved: dict[str, Any]
                 ) -> TrainConfig:
    """The shape of the checkpoint for every shape setting not given, as nanoGPT does;
    a given one that differs is a one-line error."""
    for key in MODEL_SHAPE_KEYS:
        if key in saved and key in given and getattr(cfg, key) != saved[key]:
            raise CheckpointError(f"cannot resume: {key}={getattr(cfg, key)} but the checkpoint "
                                  f"in {cfg.out_dir} has {key}={saved[key]}; drop the setting "
                                  "or start a new --out_dir")
    return dataclasses.replace(cfg, **{k: saved[k] for k in MODEL_SHAPE_KEYS if k in saved})


def saved_model_shape(out_dir: str | Path) -> dict[str, Any] | None:
    """The model section of out_dir's run.json, or None when there is none to read (the
    trainer then says what is missing)."""
    from folio.store.rundir import read_run_info
    try:
        return read_run_info(Path(out_dir)).model
    except FolioError:  # missing or unreadable: the trainer says so
        return None
