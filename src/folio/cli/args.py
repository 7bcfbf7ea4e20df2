"""The command line: `--key=value` arguments (and a preset or config file) into a settings
object, plus the names of the settings the user gave; `--help` and `--print-config` text.

Sources, later ones winning: the settings class's defaults < a preset or config file (TOML,
or a nanoGPT-style `.py` of literal assignments read with `ast`, never executed) < the
options. Nothing here changes a default: `train.recipes.resolve` does that, once.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from folio.config import Config, apply, nearest_key
from folio.errors import ConfigError
from folio.train.recipes import PRESET_ALIASES, load_preset, preset_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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


@dataclass
class ParsedArgs:
    config: Any
    given: frozenset[str] = frozenset()  # settings the user set (options or config file)
    print_config: bool = False
    help: bool = False
    source: str = ""  # preset or config file named on the command line, if any


def parse_args(cls: type[Config], argv: list[str], *, config_file: bool = False) -> ParsedArgs:
    """Parse `[BARE ...] [--key=value | --key value | --flag | --no-flag | -x value ...]`.

    Bare arguments fill the class's positional fields in order, a list field taking all the
    rest; with `config_file` the first one names a preset or config file instead (train).
    After `--` every argument is bare.
    """
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    shorts = {f.metadata["short"]: f.name for f in fields if f.metadata["short"]}
    overrides: dict[str, Any] = {}
    bare: list[str] = []
    result = ParsedArgs(config=None)
    i, options = 0, True
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not options or arg == "-" or not arg.startswith("-"):
            bare.append(arg)
        elif arg == "--":
            options = False
        elif arg in ("-h", "--help"):
            result.help = True
        elif arg in ("--print-config", "--print_config"):
            result.print_config = True
        else:
            key, value, i = _option(arg, argv, i, hints, shorts)
            if typing.get_origin(hints[key]) is list:
                overrides.setdefault(key, []).append(value)
            else:
                overrides[key] = value
    if result.help:
        return result
    if config_file and bare:
        result.source = bare.pop(0)
    _fill_positionals(fields, hints, bare, overrides)
    cfg, from_file = None, {}
    if result.source:
        from_file = load_config_source(result.source)
        cfg = apply(cls, from_file, origin=result.source)
    result.config = apply(cls, overrides, cfg)
    result.given = frozenset(from_file) | frozenset(overrides)
    return result


def _option(arg: str, argv: list[str], i: int, hints: dict[str, Any],
            shorts: dict[str, str]) -> tuple[str, str, int]:
    """(setting name, value text, index of the next argument) for the option `arg`, which
    came just before argv[i]."""
    if arg.startswith("--"):
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq and key.startswith("no_") and hints.get(key[3:]) is bool:
            return key[3:], "False", i
        if key not in hints:
            raise ConfigError(f"unknown setting --{key}{nearest_key(key, list(hints))}")
    else:
        short, eq, value = arg[1:].partition("=")
        if short not in shorts:
            raise ConfigError(f"unknown option {arg.partition('=')[0]}; settings look like "
                              "--key=value (see --help)")
        key = shorts[short]
    if eq:
        return key, value, i
    takes_flag = bool in typing.get_args(hints[key]) or hints[key] is bool
    nxt = argv[i] if i < len(argv) else None
    if takes_flag and (nxt is None or nxt.startswith("--") or
                       nxt.lower() not in ("true", "false", "1", "0", "auto")):
        return key, "True", i
    if nxt is None:
        raise ConfigError(f"--{key} needs a value, e.g. --{key}=VALUE")
    return key, nxt, i + 1


def _fill_positionals(fields: tuple, hints: dict[str, Any], bare: list[str],
                      overrides: dict[str, Any]) -> None:
    """Bare arguments into the positional fields, in order; a list field takes the rest."""
    slots = [f for f in fields if f.metadata["positional"]]
    for arg in bare:
        if not slots:
            raise ConfigError(f"unexpected argument {arg!r}; settings look like --key=value")
        name = slots[0].name
        if typing.get_origin(hints[name]) is list:
            overrides.setdefault(name, []).append(arg)
            continue
        if name in overrides:
            raise ConfigError(f"{slots[0].metadata['positional']} given twice: {arg!r} and "
                              f"--{name}={overrides[name]}")
        overrides[name] = arg
        slots.pop(0)


def synopsis(cls: type) -> str:
    """The arguments of a command for its usage line, e.g. `RUN_DIR OUT_DIR [--key=value ...]`."""
    words = []
    for f in dataclasses.fields(cls):
        metavar = f.metadata["positional"]
        if metavar:
            many = typing.get_origin(typing.get_type_hints(cls)[f.name]) is list
            word = f"{metavar} [{metavar} ...]" if many else metavar
            words.append(word if f.metadata["required"] else f"[{word}]")
    return " ".join([*words, "[--key=value ...]"])


def help_text(cls: type, usage: str) -> str:
    """`--help`: every setting with its default (or [required]) and one line of meaning."""
    lines = [usage, "", "settings (--key=value or --key value; CAPITALS: also a bare argument):"]
    for f in dataclasses.fields(cls):
        m = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = [m["positional"]] * bool(m["positional"]) + [f"-{m['short']}"] * bool(m["short"])
        flag = ", ".join([*names, f"--{f.name}"])
        lines.append(f"  {flag:<30} {m['help']} "
                     f"[{'required' if m['required'] else f'default: {default!r}'}]")
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def format_config(cfg: Any) -> str:
    """The resolved config as TOML-like `key = value` lines (loadable as a .py config too)."""
    return "\n".join(f"{k} = {v!r}" for k, v in to_dict(cfg).items())
