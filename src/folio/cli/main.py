"""The `folio` command: parses arguments and hands typed settings to the module that acts.

Every FolioError becomes one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from folio import config
from folio.errors import FolioError

USAGE = """usage: folio COMMAND [ARGS]

Train small GPT language models on the computer you have.

commands:
  prepare         tokenize a dataset (shakespeare_char, shakespeare, or your text files)
  train           train a GPT (accepts nanoGPT's train.py settings)
  sample          generate text from a trained run (accepts nanoGPT's sample.py settings)
  plot            draw loss curves from runs or from a pasted nanoGPT log
  serve           web page (runs, live loss curves, playground) + OpenAI-compatible API
  bench           measure training speed on this machine
  export          write a run as a Hugging Face transformers model
  import-nanogpt  convert a nanoGPT out dir (ckpt.pt) into a folio run dir

`folio COMMAND --help` lists a command's settings. Quick start:
  folio prepare shakespeare_char && folio train && folio sample --out_dir=out-shakespeare-char
"""


def parse_settings(cls: type, argv: list[str], usage: str, positional: str | None):
    """Parse dataclass settings; print help or the resolved config when asked."""
    parsed = config.parse_args(cls, argv, positional=positional)
    if parsed.help:
        print(config.help_text(cls, usage))
        return None
    if parsed.print_config:
        print(config.format_config(parsed.config))
        return None
    return parsed


def cmd_prepare(argv: list[str]) -> int:
    usage = ("usage: folio prepare DATASET|PATH [--tokenizer char|gpt2] [--name NAME] "
             "[--data_dir DIR] [--val_fraction F] [--source PATH_OR_URL]")
    parsed = parse_settings(config.PrepareConfig, argv, usage, positional="dataset")
    if parsed:
        from folio.data.prepare import prepare
        prepare(parsed.config)
    return 0


def cmd_train(argv: list[str]) -> int:
    usage = ("usage: folio train [PRESET|CONFIG.toml|CONFIG.py] [--key=value ...]\n"
             f"presets: {', '.join(config.preset_names())}")
    parsed = parse_settings(config.TrainConfig, argv, usage, positional="config")
    if not parsed:
        return 0
    from folio.train.loop import train
    return train(parsed.config, explicit_source=bool(parsed.source),
                 explicit_keys=_explicit_keys(argv))


def _explicit_keys(argv: list[str]) -> set[str]:
    """Setting names given on the command line (so auto-defaults never override them)."""
    keys = set()
    for arg in argv:
        if arg.startswith("--"):
            key = arg[2:].partition("=")[0].replace("-", "_")
            keys.add(key[3:] if key.startswith("no_") else key)
    return keys


def cmd_sample(argv: list[str]) -> int:
    usage = "usage: folio sample [RUN_DIR] [--out_dir=RUN_DIR] [--start=TEXT|FILE:path] ..."
    parsed = parse_settings(config.SampleConfig, argv, usage, positional="out_dir")
    if parsed:
        from folio.infer.sample import run
        run(parsed.config)
    return 0


def cmd_plot(argv: list[str]) -> int:
    from folio.watch.plot import main as plot_main
    return plot_main(argv)


def cmd_serve(argv: list[str]) -> int:
    usage = ("usage: folio serve [RUN_DIR ...] [--runs_dir DIR] [--host 127.0.0.1] "
             "[--port 8000] [--api_key KEY] ...")
    parsed = parse_settings(config.ServeConfig, argv, usage, positional="run_dirs")
    if parsed:
        from folio.infer.serve.app import serve
        serve(parsed.config)
    return 0


def cmd_bench(argv: list[str]) -> int:
    from folio.train.bench import main as bench_main
    return bench_main(argv)


def cmd_export(argv: list[str]) -> int:
    from folio.store.hf import export_main
    return export_main(argv)


def cmd_import_nanogpt(argv: list[str]) -> int:
    from folio.store.nanogpt import import_nanogpt_main
    return import_nanogpt_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "sample": cmd_sample,
    "plot": cmd_plot,
    "serve": cmd_serve,
    "bench": cmd_bench,
    "export": cmd_export,
    "import-nanogpt": cmd_import_nanogpt,
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises a FolioError instead of printing usage and exiting."""

    def error(self, message: str):
        raise config.ConfigError(f"{message} (see `{self.prog} --help`)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        hint = config.nearest_key(command, list(COMMANDS)).replace("--", "")
        print(f"folio: error: unknown command {command!r}{hint}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except FolioError as e:
        print(f"folio: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("folio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `folio sample | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
