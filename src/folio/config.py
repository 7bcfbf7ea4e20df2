"""Typed settings for every command, and the one parser that fills them.

Sources, later ones winning: dataclass defaults < preset or config file (TOML, or a
nanoGPT-style `.py` of literal assignments read with `ast`, never executed) < `--key=value`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from folio.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AUTO = "auto"
# nanoGPT config file stems that map onto shipped presets.
PRESET_ALIASES = {"train_shakespeare_char": "shakespeare_char", "train_gpt2": "gpt2_124m"}


def setting(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
            max: float | None = None, above: float | None = None) -> Any:
    """A dataclass field with a one-line help text and optional range checks."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "above": above}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything `folio train` reads. Names and meanings follow nanoGPT's train.py."""

    # I/O
    out_dir: str = setting("out", "run directory: weights, state, metrics.jsonl, loss.png")
    eval_interval: int = setting(250, "evaluate train/val loss every this many iterations", min=1)
    log_interval: int = setting(10, "print a progress line every this many iterations", min=1)
    eval_iters: int = setting(200, "batches per split when estimating the loss", min=1)
    eval_only: bool = setting(False, "evaluate once and exit")
    always_save_checkpoint: bool = setting(False, "save at every eval, not only when val improves")
    init_from: str = setting("scratch", "scratch | resume | gpt2[-medium|-large|-xl] | HF dir")
    seed: int = setting(1337, "random seed (each DDP rank adds its rank)", min=0)
    # logging
    wandb_log: bool = setting(False, "log metrics to Weights & Biases (pip install folio[wandb])")
    wandb_project: str = setting("folio", "wandb project name")
    wandb_run_name: str = setting("run", "wandb run name")
    tensorboard: bool = setting(False, "write TensorBoard event files into out_dir")
    # data
    dataset: str = setting("shakespeare_char", "prepared dataset name under data_dir")
    data_dir: str = setting("data", "where prepared datasets live")
    gradient_accumulation_steps: int = setting(1, "micro-steps per iteration (global, all ranks)",
                                               min=1)
    batch_size: int = setting(12, "sequences per micro-step per process", min=1)
    block_size: int = setting(64, "context length in tokens", min=1)
    # model
    n_layer: int = setting(4, "transformer blocks", min=1)
    n_head: int = setting(4, "attention heads per block", min=1)
    n_embd: int = setting(128, "embedding width (divisible by n_head)", min=1)
    dropout: float = setting(0.0, "dropout probability", min=0.0, max=0.999)
    bias: bool = setting(False, "use biases in Linear and LayerNorm layers")
    # optimizer
    learning_rate: float = setting(1e-3, "peak learning rate", above=0.0)
    max_iters: int = setting(2000, "total training iterations", min=0)
    weight_decay: float = setting(1e-1, "AdamW weight decay on 2-D parameters", min=0.0)
    beta1: float = setting(0.9, "AdamW beta1", min=0.0, max=0.999999)
    beta2: float = setting(0.99, "AdamW beta2", min=0.0, max=0.999999)
    grad_clip: float = setting(1.0, "clip gradient norm at this value; 0 disables", min=0.0)
    # learning rate schedule
    decay_lr: bool = setting(True, "warmup then cosine decay; False keeps learning_rate")
    warmup_iters: int = setting(100, "linear warmup iterations", min=0)
    lr_decay_iters: int = setting(2000, "iteration where the cosine reaches min_lr", min=1)
    min_lr: float = setting(1e-4, "learning rate floor", min=0.0)
    # system
    backend: str = setting(AUTO, "distributed backend", choices=(AUTO, "nccl", "gloo"))
    device: str = setting(AUTO, "auto | cpu | cuda | cuda:N | mps")
    dtype: str = setting(AUTO, "compute dtype", choices=(AUTO, "float32", "bfloat16", "float16"))
    compile: bool | str = setting(AUTO, "torch.compile the model: auto | True | False")
    fsdp: bool = setting(False, "shard the model with FSDP2 under torchrun")
    peak_tflops: float = setting(0.0, "device peak for MFU; 0 looks it up or measures it",
                                 min=0.0)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                              "pick n_embd as a multiple of n_head")
        check_device_name(self.device)


@dataclass
class SampleConfig:
    """Everything `folio sample` reads. Names and meanings follow nanoGPT's sample.py."""

    out_dir: str = setting("out", "run directory to sample from (folio or nanoGPT)")
    start: str = setting("\n", "prompt text, or FILE:path to read it from a file")
    num_samples: int = setting(10, "number of samples", min=1)
    max_new_tokens: int = setting(500, "tokens generated per sample", min=1)
    temperature: float = setting(0.8, "softmax temperature; 0 is greedy", min=0.0)
    top_k: int | None = setting(200, "keep the k most likely tokens; None keeps all", min=1)
    top_p: float = setting(1.0, "nucleus sampling: keep the smallest set with this mass",
                           above=0.0, max=1.0)
    seed: int = setting(1337, "random seed", min=0)
    device: str = setting(AUTO, "auto | cpu | cuda | cuda:N | mps")
    dtype: str = setting(AUTO, "compute dtype", choices=(AUTO, "float32", "bfloat16", "float16"))
    compile: bool = setting(False, "torch.compile the model")
    stop: list[str] = setting([], "stop a sample at this string (repeatable)")
    stream: bool = setting(True, "print tokens as they are generated")

    def __post_init__(self) -> None:
        validate_fields(self)
        check_device_name(self.device)


@dataclass
class PrepareConfig:
    """Everything `folio prepare` reads."""

    dataset: str = setting("shakespeare_char", "shakespeare_char | shakespeare | openwebtext | "
                           "fineweb-edu | hf:NAME[:CONFIG] | PATH (.txt, .jsonl[.gz|.zst], "
                           ".parquet, directory or glob)")
    tokenizer: str = setting(AUTO, "char | gpt2 | tiktoken:NAME | hf:PATH (a local tokenizer "
                             "dir); auto: gpt2 for hub datasets and shakespeare, char for files")
    name: str = setting("", "output name under data_dir (default: from the dataset)")
    data_dir: str = setting("data", "where prepared datasets are written")
    val_fraction: float | None = setting(None, "fraction held out for validation, in (0, 1); "
                                         "None: 0.1, or 0.0005 for openwebtext / fineweb-edu",
                                         above=0.0)
    source: str = setting("", "where to read a named dataset: tiny Shakespeare's file or URL; "
                          "a datasets dir or hub name for openwebtext / fineweb-edu")
    text_field: str = setting("text", "the text's field in .jsonl / .parquet / hub records")
    split: str = setting("train", "hub dataset split to read (val is carved out of it)")
    tokens: str = setting("", "fineweb-edu sample to prepare: 10B | 100B | 350B (default 10B)")
    keep_newlines: bool = setting(False, "keep \\r\\n and \\r line endings (default: made \\n)")
    num_proc: int = setting(0, "tokenizer processes; 0: one per core for large inputs", min=0)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.val_fraction is not None and self.val_fraction >= 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} is too large; expected a "
                              "number between 0 and 1 (exclusive), e.g. 0.1")
        kind, _, arg = self.tokenizer.partition(":")
        if self.tokenizer not in (AUTO, "char", "gpt2") and not (kind in ("tiktoken", "hf")
                                                                   and arg):
            raise ConfigError(f"tokenizer={self.tokenizer!r} is not allowed; expected one of "
                              "auto, char, gpt2, tiktoken:NAME or hf:PATH")


Config = TypeVar("Config", TrainConfig, SampleConfig, PrepareConfig)


# ---------------------------------------------------------------------------- validation

def check_device_name(device: str) -> None:
    base, _, index = device.partition(":")
    ok = device in (AUTO, "cpu", "mps", "cuda") or (base == "cuda" and index.isdigit())
    if not ok:
        raise ConfigError(f"device={device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


def validate_fields(cfg: Any) -> None:
    """Check each field's value against its type, choices and range."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        value = coerce(f.name, value, hints[f.name])
        object.__setattr__(cfg, f.name, value)
        m = f.metadata
        is_auto = value == AUTO and m["choices"] is None
        if value is None or isinstance(value, (list, bool)) or is_auto:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}={value!r} is not a finite number")
        if m["choices"] and value not in m["choices"]:
            raise ConfigError(f"{f.name}={value!r} is not allowed; expected one of "
                              f"{', '.join(map(str, m['choices']))}")
        if m["min"] is not None and value < m["min"]:
            raise ConfigError(f"{f.name}={value!r} is too small; expected >= {m['min']}")
        if m["max"] is not None and value > m["max"]:
            raise ConfigError(f"{f.name}={value!r} is too large; expected <= {m['max']}")
        if m["above"] is not None and value <= m["above"]:
            raise ConfigError(f"{f.name}={value!r} must be > {m['above']}")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a string (command line) or a literal (config file) into the field's type."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    if isinstance(value, str):
        if type(None) in options and value.lower() == "none":
            return None
        if str in options and (bool not in options or value == AUTO):
            return value
    for kind in options:
        if kind is type(None) or kind is str:
            continue
        try:
            return _coerce_one(value, kind)
        except (TypeError, ValueError):
            continue
    raise ConfigError(f"{key}={value!r} is not {_describe(options)}")


def _coerce_one(value: Any, kind: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise ValueError
    if kind is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            number = float(value) if any(c in value.lower() for c in ".e") else int(value)
            if float(number).is_integer():
                return int(number)
        raise ValueError
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise ValueError
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError
    raise TypeError(kind)


def _describe(options: tuple) -> str:
    names = {bool: "a boolean (True/False/1/0)", int: "an integer", float: "a number",
             str: "a string", type(None): "None"}
    words = [names.get(o, "a list of strings") for o in options]
    if bool in options and str in options:
        words = ["auto or a boolean (True/False/1/0)"]
    return " or ".join(words)


# ---------------------------------------------------------------------------- sources

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


def load_config_source(spec: str) -> dict[str, Any]:
    """Settings from a preset name, a TOML file or a nanoGPT-style .py file."""
    path = Path(spec)
    if path.suffix in (".toml", ".py"):
        if not path.is_file():
            stem = PRESET_ALIASES.get(path.stem, path.stem)
            if stem in preset_names():  # nanoGPT's config/train_shakespeare_char.py, say
                return load_preset(stem)
            raise ConfigError(f"config file {spec} not found; give a path or one of the presets: "
                              f"{', '.join(preset_names())}")
        text = _read_text(path)
        if path.suffix == ".toml":
            try:
                return tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{spec}: not valid TOML ({e})") from None
        return parse_python_config(text, spec)
    return load_preset(spec)


def _read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None


def parse_python_config(text: str, filename: str = "<config>") -> dict[str, Any]:
    """Read `name = literal` lines with ast; anything else is refused, nothing is executed."""
    try:
        tree = ast.parse(text, filename=filename)
    except SyntaxError as e:
        raise ConfigError(f"{filename} line {e.lineno}: not valid Python ({e.msg})") from None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring or bare string
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
                continue
            except ValueError:
                pass
        line = ast.get_source_segment(text, node) or type(node).__name__
        raise ConfigError(f"{filename} line {node.lineno}: only `name = literal` assignments "
                          f"are allowed, found `{line.splitlines()[0]}` "
                          "(folio never runs config files)")
    return values


def nearest_key(key: str, keys: list[str]) -> str:
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f"; did you mean --{match[0]}?" if match else "; see --help for the valid keys"


def apply(cls: type[Config], values: dict[str, Any], base: Config | None = None,
          origin: str = "") -> Config:
    """A new config with `values` applied over `base` (or the defaults), fully validated."""
    current = dataclasses.asdict(base) if base is not None else {}
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in names:
            where = f" in {origin}" if origin else ""
            raise ConfigError(f"unknown setting {key!r}{where}{nearest_key(key, names)}")
        if typing.get_origin(hints[key]) is list and isinstance(value, str):
            value = [*current.get(key, []), value]
        current[key] = value
    return cls(**current)


# ---------------------------------------------------------------------------- command line

@dataclass
class ParsedArgs:
    config: Any
    print_config: bool = False
    help: bool = False
    source: str = ""  # preset or config file named on the command line, if any


def parse_args(cls: type[Config], argv: list[str], positional: str | None = None,
               base: dict[str, Any] | None = None) -> ParsedArgs:
    """Parse `[POSITIONAL] [--key=value | --key value | --flag | --no-flag ...]`.

    `positional` names what a bare first argument means: "config" (a preset or config file)
    or a field name (e.g. "dataset"). `base` supplies settings applied before the file.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    overrides: dict[str, Any] = {}
    result = ParsedArgs(config=None)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            result.help = True
            continue
        if arg in ("--print-config", "--print_config"):
            result.print_config = True
            continue
        if not arg.startswith("--"):
            if positional is None or (result.source or positional in overrides):
                raise ConfigError(f"unexpected argument {arg!r}; settings look like --key=value")
            if positional == "config":
                result.source = arg
            else:
                overrides[positional] = arg
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        negated = not eq and key.startswith("no_") and key[3:] in names and hints[key[3:]] is bool
        if negated:
            key, value = key[3:], "False"
        elif key not in names:
            raise ConfigError(f"unknown setting --{key}{nearest_key(key, names)}")
        elif not eq:
            takes_flag = bool in typing.get_args(hints[key]) or hints[key] is bool
            nxt = argv[i] if i < len(argv) else None
            if takes_flag and (nxt is None or nxt.startswith("--") or
                               nxt.lower() not in ("true", "false", "1", "0", "auto")):
                value = "True"
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value, e.g. --{key}=VALUE")
            else:
                value, i = nxt, i + 1
        if typing.get_origin(hints[key]) is list:
            overrides.setdefault(key, [])
            overrides[key].append(value)
        else:
            overrides[key] = value
    if result.help:
        return result
    cfg = apply(cls, base or {}) if base else None
    if result.source:
        cfg = apply(cls, load_config_source(result.source), cfg, origin=result.source)
    result.config = apply(cls, overrides, cfg)
    return result


def help_text(cls: type, usage: str) -> str:
    """`--help`: every key with its default and one line of meaning."""
    lines = [usage, "", "settings (--key=value or --key value):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name:<28} {f.metadata['help']} [default: {default!r}]")
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def format_config(cfg: Any) -> str:
    """The resolved config as TOML-like `key = value` lines (loadable as a .py config too)."""
    return "\n".join(f"{k} = {v!r}" for k, v in to_dict(cfg).items())
