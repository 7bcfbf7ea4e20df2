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
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from folio.config import AUTO, TrainConfig, apply, parse_duration
from folio.errors import CheckpointError, ConfigError, FolioError
from folio.store.rundir import RunInfo, read_run_info
from folio.train import sizing

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
                        "wandb_project", "wandb_run_name", "tensorboard", "overwrite", "time"})
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
            saved: RunInfo | None = None, source: str = "",
            machine: Callable[[TrainConfig], Machine | None] | None = None
            ) -> tuple[TrainConfig, str]:
    """The final settings of a run and a note for the log ("" when nothing was filled in).

    `given`: the names of the settings the user set (command line or config file, `source`).
    A bare `folio train` (no preset or config file, and no setting beyond PLACE_KEYS) trains
    the tiny-Shakespeare character model sized for the device: nanoGPT README's CPU model on
    a CPU, nanoGPT's GPU char model (`shakespeare_char`) on cuda or mps. Any other setting
    means nanoGPT's train.py defaults for the rest, on every device. The recipe (default_recipe)
    then fills what was not given. A --time budget plans the run on the clock and, with no
    shape given, sizes the model for the budget (sizing.py; `machine(cfg)` gives the device's
    speed and the dataset's size). A resumed run (`saved`: its run.json) goes on with its
    recipe and budget and takes the shape it was trained with; a different shape that was
    given is a one-line error.
    """
    notes = []
    if cfg.init_from == "resume" and saved is not None:
        cfg, given = resumed_settings(cfg, given, saved)
    bare = not (given - PLACE_KEYS) and cfg.init_from in ("scratch", "resume")
    if bare:
        name = DEVICE_PRESETS.get(device_type, DEVICE_PRESETS["cpu"])
        cfg = fill(cfg, load_preset(name), given)
        if not cfg.time:
            notes.append(f"no model or training settings given, so on {device_type} folio "
                         f"trains the {name} preset's model ({cfg.n_layer} layers, "
                         f"{cfg.n_embd} wide, {cfg.max_iters} iters, out_dir {cfg.out_dir}) "
                         "with the modern recipe; any such setting, or a preset, gives "
                         "nanoGPT's train.py defaults instead")
    if "recipe" not in given:
        cfg = apply(TrainConfig, {"recipe": default_recipe(cfg, bare, source)}, cfg)
    if cfg.time:
        cfg, why, sized = budgeted(cfg, given, device_type, machine)
        notes.append(why)
        given = given | sized  # the size's weight decay wins over the recipe's
    if cfg.recipe == "modern":
        filled = [f"{k}={v}" for k, v in MODERN_RECIPE.items() if k not in given]
        if "tie_head" not in given:
            filled.append("head untied unless it outweighs the blocks")
        notes.append("recipe modern: " + ", ".join(filled))
        cfg = fill(cfg, MODERN_RECIPE, given)
    if cfg.init_from == "resume" and saved is not None:
        cfg = resume_shape(cfg, given, saved.model)
    return cfg, "; ".join(notes)


# The recipe when --recipe is not given: modern where folio chooses the settings (a bare
# `folio train`, any --time run, folio's own presets); nanoGPT's where they come from nanoGPT
# (its command lines, its .py config files, these presets); --recipe decides either way.
NANOGPT_PRESETS = frozenset({"shakespeare_char", "shakespeare_char_cpu", "gpt2_124m",
                             "finetune_shakespeare"})


def default_recipe(cfg: TrainConfig, bare: bool, source: str) -> str:
    """The recipe for settings that do not name one (the rule above NANOGPT_PRESETS)."""
    if bare or cfg.time:
        return "modern"
    preset = PRESET_ALIASES.get(Path(source).stem, Path(source).stem) if source else ""
    folio_preset = preset in preset_names() and preset not in NANOGPT_PRESETS \
        and not source.endswith(".py")
    return "modern" if folio_preset else "nanogpt"


@dataclass(frozen=True)
class Machine:
    """What sizing a budgeted run needs to know: the device's measured matmul peak (FLOP/s)
    and the dataset's training tokens and vocabulary."""

    peak_flops: float
    train_tokens: int
    vocab_size: int


# What a budgeted run changes where nothing was given: no iteration limit and no decay length
# (the schedule follows the clock; a preset's lr_decay_iters = 2000 once cut every budgeted CPU
# run's learning rate to zero at iteration 2000), ten evaluations spread over the budget, on 20
# batches each (nanoGPT README's CPU figure).
BUDGET_DEFAULTS: dict[str, Any] = {"max_iters": None, "lr_decay_iters": None, "eval_interval": 0,
                                   "eval_iters": 20, "always_save_checkpoint": False}


def budgeted(cfg: TrainConfig, given: frozenset[str], device_type: str,
             machine: Callable[[TrainConfig], Machine | None] | None
             ) -> tuple[TrainConfig, str, frozenset[str]]:
    """A --time run's settings: BUDGET_DEFAULTS and, with no shape setting given, the size
    sizing.choose picks (for the settings not given); the note that says which and why; and
    the names of the settings the size filled."""
    cfg = fill(cfg, BUDGET_DEFAULTS, given)
    limit = "" if cfg.max_iters is None else f" or {cfg.max_iters} iters, whichever ends first"
    note = f"time budget {cfg.time}{limit}"
    found = None
    if not given & frozenset(SIZE_KEYS) and machine is not None and cfg.init_from == "scratch":
        found = machine(cfg)
    if found is None:
        return cfg, note, frozenset()
    size, why = sizing.choose(parse_duration(cfg.time), found.peak_flops, found.train_tokens,
                              found.vocab_size)
    sized = {k: v for k, v in size.settings().items() if k not in given}
    note += (f"; size for the budget on {device_type}: {size.n_layer} layers, {size.n_embd} "
             f"wide, block {size.block_size}, batch {size.batch_size} ({why})")
    return apply(TrainConfig, sized, cfg), note, frozenset(sized)


SIZE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout")


def resumed_settings(cfg: TrainConfig, given: frozenset[str], saved: RunInfo
                     ) -> tuple[TrainConfig, frozenset[str]]:
    """A resumed run goes on with the recipe, time budget and task it was trained with, where
    none is given (its model shape: resume_shape)."""
    keep = {k: saved.config[k] for k in ("recipe", "time", "task") if k in saved.config
            and k not in given}
    if keep.get("time") and "max_iters" not in given:
        keep["max_iters"] = saved.config.get("max_iters")
    return apply(TrainConfig, keep, cfg), given | frozenset(keep)


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


def saved_run(out_dir: str | Path) -> RunInfo | None:
    """out_dir's run.json, or None when there is none to read (the trainer then says what is
    missing)."""
    try:
        return read_run_info(Path(out_dir))
    except FolioError:  # missing or unreadable: the trainer says so
        return None
