"""The `folio` command: each command's settings class, usage and runner, and the dispatch.

Every command parses through `cli/args.py`'s `parse_args` into its settings dataclass (and the names
the user gave); `folio train` resolves them once (`train.recipes.resolve`) and hands the
final settings to one library function. Every FolioError becomes one line on stderr and a
non-zero exit code.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from folio import config
from folio.cli.args import ParsedArgs, format_config, help_text, parse_args, synopsis
from folio.errors import ConfigError, FolioError
from folio.extras import need
from folio.train import recipes

# Runners import their library lazily, so `folio --help` and bad input never wait for torch.

def run_prepare(cfg: config.PrepareConfig) -> int:
    if cfg.format == "chat":
        from folio.data.chat_prepare import prepare_chat
        prepare_chat(cfg, run_tokenizer(cfg.tokenizer))
        return 0
    from folio.data.prepare import prepare
    prepare(cfg)
    return 0


def run_tokenizer(choice: str) -> Any:
    """The tokenizer of the model in directory `choice` (a folio run dir, or a Hugging Face
    dir folio exported), for a chat dataset a run finetunes on; None for any other choice."""
    from pathlib import Path
    path = Path(choice).expanduser()
    if not path.is_dir() or not any((path / f).is_file() for f in ("run.json", "config.json")):
        return None
    from folio.data.tokenizer import tokenizer_from_spec
    from folio.store.rundir import RUN_INFO, read_run_info
    if (path / RUN_INFO).is_file():
        return tokenizer_from_spec(read_run_info(path).tokenizer)
    from folio.store.sources import load_model
    return load_model(path)[1]


def run_chat(cfg: config.ChatConfig) -> int:
    from folio.infer.chat import run
    run(cfg)
    return 0


def run_tokenizer_train(cfg: config.TokenizerTrainConfig) -> int:
    from folio.data.tokenizer_train import train_tokenizer
    train_tokenizer(cfg)
    return 0


def run_tokenizer_eval(cfg: config.TokenizerEvalConfig) -> int:
    from folio.data.tokenizer_eval import evaluate_tokenizer
    evaluate_tokenizer(cfg)
    return 0


def run_eval(cfg: config.EvalConfig) -> int:
    if cfg.tasks:
        from folio.train.eval_tasks import run_tasks
        run_tasks(cfg)
    if cfg.data or not cfg.tasks:
        from folio.train.eval_run import evaluate_run
        evaluate_run(cfg)
    return 0


def run_train(resolved: Resolved) -> int:
    from folio.train.loop import train
    code = train(resolved.settings, resolved.note, resolved.started)
    if code == 0 and resolved.settings.report:
        report_after_training(resolved.settings)
    return code


def report_after_training(cfg: config.TrainConfig) -> None:
    """The finished run's report card (rank 0 only); never fails the run that trained."""
    from folio.infer.card import write_card
    from folio.machine.distributed import from_env
    from folio.train.budget import card_sample_seconds
    if not from_env().is_master:
        return
    limit = card_sample_seconds(config.parse_duration(cfg.time) if cfg.time else None)
    try:
        path, notes = write_card([cfg.out_dir], max_seconds=limit)
    except Exception as e:  # noqa: BLE001 - the run is trained and saved: a card is a bonus
        print(f"folio: no report card ({type(e).__name__}: {e})", file=sys.stderr)
        return
    for note in notes:
        print(f"folio: {note}", file=sys.stderr)
    print(f"folio: report card: {path}", flush=True)


def run_report(cfg: config.ReportConfig) -> int:
    from folio.infer.card import write_card
    path, notes = write_card(cfg.run_dirs, cfg.out, cfg.x, cfg.samples)
    for note in notes:
        print(f"folio: {note}", file=sys.stderr)
    print(f"folio: wrote {path} and {path.with_suffix('.md')}")
    return 0


def run_sample(cfg: config.SampleConfig) -> int:
    from folio.infer.sample import run
    run(cfg)
    return 0


def run_plot(cfg: config.PlotConfig) -> int:
    from folio.watch.plot import plot_runs
    plot_runs(cfg)
    return 0


def run_serve(cfg: config.ServeConfig) -> int:
    need("fastapi", "serve", "folio serve")
    need("uvicorn", "serve", "folio serve")
    from folio.infer.serve.app import serve
    serve(cfg)
    return 0


def run_bench(cfg: config.BenchConfig) -> int:
    from folio.speed.bench import bench
    return bench(cfg)


def run_export(cfg: config.ExportConfig) -> int:
    from folio.store.export import export
    export(cfg)
    return 0


def run_import_nanogpt(cfg: config.ImportNanoGPTConfig) -> int:
    from folio.store.nanogpt import import_run
    import_run(cfg)
    return 0


@dataclass(frozen=True)
class Resolved:
    """A command's final settings, what was filled in (a note for the log), and when the
    command started (a --time budget counts from then, imports included)."""

    settings: Any
    note: str = ""
    started: float | None = None


def resolve_train(parsed: ParsedArgs) -> Resolved:
    """The settings `folio train` trains with here, and the note on what was filled in."""
    started = time.monotonic() - process_age()  # the budget counts the start-up too
    from folio.machine.device import resolve_device
    cfg = parsed.config
    saved = recipes.saved_run(cfg.out_dir) if cfg.init_from == "resume" else None
    device = resolve_device(cfg.device)
    settings, note = recipes.resolve(cfg, parsed.given, device.type, saved, parsed.source,
                                     lambda resolved: budget_machine(resolved, device))
    return Resolved(settings, note, started)


def process_age() -> float:
    """Seconds since this process started (Linux's /proc; 0 where that cannot be read)."""
    try:
        start_ticks = float(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


# Tiny Shakespeare's training tokens and vocabulary, for sizing a run before it is prepared
KNOWN_SIZES = {"shakespeare_char": (1_003_854, 65), "shakespeare": (301_966, 50257)}


def budget_machine(cfg: config.TrainConfig, device: Any) -> recipes.Machine | None:
    """What sizing a --time run needs: this device's measured matmul peak, and the dataset's
    size (from its meta.json, or tiny Shakespeare's known size); None when unknown."""
    import json
    from pathlib import Path

    from folio.machine.device import DTYPES, cpu_supports_bf16, peak_flops
    meta = Path(cfg.data_dir) / cfg.dataset / "meta.json"
    try:
        data = json.loads(meta.read_text("utf-8"))
        tokens, vocab = int(data["train_tokens"]), int(data["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        if cfg.dataset not in KNOWN_SIZES:
            return None
        tokens, vocab = KNOWN_SIZES[cfg.dataset]
    dtype = "bfloat16" if device.type == "cuda" or cpu_supports_bf16() else "float32"
    return recipes.Machine(peak_flops(device, DTYPES[dtype], cfg.peak_tflops), tokens, vocab)


def presets_note() -> str:
    return f"presets: {', '.join(recipes.preset_names())}"


def bench_note() -> str:
    from folio.speed.bench import describe_cases
    return f"cases:\n{describe_cases()}"


def eval_note() -> str:
    return ("lm-evaluation-harness tasks (pip install 'folio[eval]'), on the run's Hugging "
            "Face export:\n"
            "  folio eval out --tasks=hellaswag,arc_easy,arc_challenge,piqa,winogrande "
            "--limit=500\n"
            "  folio eval out --tasks=path/to/my_task/ --num_fewshot=0\n"
            "Hub tasks download their dataset from the Hugging Face hub once (internet needed; "
            "then\nHF_DATASETS_OFFLINE=1 reads the cache); `lm-eval ls tasks` lists the names. A "
            "local task is a\ndirectory (or YAML file) of lm-eval task configs. Results are "
            "appended to RUN/evals.jsonl.")


EXPORT_FORMATS = """formats (what each keeps; what it refuses in one line, writing nothing):
  hf    a transformers dir: GPT2LMHeadModel (nanoGPT recipe), ApertusForCausalLM (rotary,
        RMSNorm, QK-norm; ReLU2 or GELU MLP), ArceeForCausalLM (the same without QK-norm),
        LlamaForCausalLM / Qwen3ForCausalLM (SwiGLU: imported Llama, SmolLM2, Qwen3 models);
        f32/f16/bf16 weights, biases, tied or untied head, the real vocabulary; tokenizer.json
        for char, gpt2, tiktoken:NAME, hf:PATH and trained tokenizers.
        Refuses --logit_softcap, bias=True with QK-norm, modern pieces on a GPT-2 model, q8_0.
  gguf  one FILE.gguf (llama.cpp, Ollama, LM Studio) and an Ollama Modelfile beside it:
        llama.cpp gpt2 (nanoGPT recipe), apertus (QK-norm, ReLU2), arcee (no QK-norm, ReLU2);
        f32/f16/bf16/q8_0 matrices (vectors f32); char vocabularies as sentencepiece pieces,
        byte-level BPE (gpt2, tiktoken:NAME, trained, hf:PATH) with the llama.cpp
        pre-tokenizer of the same split regex (gpt-2, llama-bpe, gpt-4o).
        Refuses what hf refuses, mlp=gelu, imported shapes (SwiGLU, grouped-query heads),
        a chat run's added tokens, bias=True on arcee, a split pattern llama.cpp has
        no exact name for (cl100k_base), normalizers, a char vocabulary holding U+2581.
run it:
  folio export RUN model.gguf --format=gguf
  llama-cli -m model.gguf -p "ROMEO:" -n 100 --temp 0     (llama.cpp)
  ollama create NAME -f Modelfile && ollama run NAME      (Ollama)"""


def export_note() -> str:
    return EXPORT_FORMATS


@dataclass(frozen=True)
class Command:
    """One `folio` command: the settings class its line parses into, and what runs them."""

    settings: type
    summary: str  # its line in `folio --help`
    run: Callable[[Any], int]
    config_file: bool = False  # a first bare argument names a preset or config file
    note: Callable[[], str] | None = None  # more lines for its --help
    # the final settings (and a note) from the parse, for running and --print-config; the
    # settings as parsed when None
    resolve: Callable[[ParsedArgs], Resolved] | None = None


COMMANDS: dict[str, Command] = {
    "prepare": Command(config.PrepareConfig, "tokenize a dataset (shakespeare_char, "
                       "shakespeare, or your text files)", run_prepare),
    "tokenizer train": Command(config.TokenizerTrainConfig, "train a byte-level BPE "
                               "tokenizer on your text", run_tokenizer_train),
    "tokenizer eval": Command(config.TokenizerEvalConfig, "bytes per token of a trained "
                              "tokenizer beside GPT-2's and characters", run_tokenizer_eval),
    "train": Command(config.TrainConfig, "train a GPT (accepts nanoGPT's train.py settings)",
                     run_train, config_file=True, note=presets_note, resolve=resolve_train),
    "eval": Command(config.EvalConfig, "loss and bits per byte of a run on a fixed number of "
                    "tokens of any text, with confidence intervals; lm-eval tasks",
                    run_eval, note=eval_note),
    "sample": Command(config.SampleConfig, "generate text from a trained run (accepts "
                      "nanoGPT's sample.py settings)", run_sample),
    "chat": Command(config.ChatConfig, "talk to a run finetuned with --task=chat in the "
                    "terminal", run_chat),
    "plot": Command(config.PlotConfig, "draw loss curves from runs or from a pasted nanoGPT log",
                    run_plot),
    "report": Command(config.ReportConfig, "a report card (self-contained HTML + markdown) of "
                      "one run, or several compared", run_report),
    "serve": Command(config.ServeConfig, "web page (runs, live loss curves, playground) and an "
                     "OpenAI-compatible API", run_serve),
    "bench": Command(config.BenchConfig, "measure training speed on this machine", run_bench,
                     note=bench_note),
    "export": Command(config.ExportConfig, "write a run as a Hugging Face transformers model "
                      "with its tokenizer, or as GGUF for llama.cpp and Ollama", run_export,
                      note=export_note),
    "import-nanogpt": Command(config.ImportNanoGPTConfig, "convert a nanoGPT out dir (ckpt.pt) "
                              "into a folio run dir", run_import_nanogpt),
}

GROUPS = {name.split()[0] for name in COMMANDS if " " in name}  # commands of two words

USAGE = f"""usage: folio COMMAND [ARGS]

Train small GPT language models on the computer you have.

commands:
{chr(10).join(f"  {name:<15} {c.summary}" for name, c in COMMANDS.items())}

`folio COMMAND --help` lists a command's settings. Quick start:
  folio prepare shakespeare_char && folio train && folio sample --out_dir=out-shakespeare-char
"""


def usage(name: str, command: Command) -> str:
    """A command's usage line, what it does, and its notes (presets, cases)."""
    lead = "[PRESET|CONFIG.toml|CONFIG.py] " if command.config_file else ""
    lines = [f"usage: folio {name} {lead}{synopsis(command.settings)}", "",
             " ".join((command.settings.__doc__ or "").split())]
    if command.note:
        lines.append(command.note())
    return "\n".join(lines)


def run_command(name: str, argv: list[str]) -> int:
    """Parse argv into the command's settings; print help or the config, or run it."""
    command = COMMANDS[name]
    parsed = parse_args(command.settings, argv, config_file=command.config_file)
    if parsed.help:
        print(help_text(command.settings, usage(name, command)))
        return 0
    if command.resolve is None:
        settings = parsed.config
        if parsed.print_config:
            print(format_config(settings))
            return 0
        return command.run(settings)
    resolved = command.resolve(parsed)
    if parsed.print_config:
        print(format_config(resolved.settings))
        return 0
    return command.run(resolved)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command in GROUPS and rest and f"{command} {rest[0]}" in COMMANDS:  # folio tokenizer train
        command, rest = f"{command} {rest[0]}", rest[1:]
    try:
        if command in ("-h", "--help"):
            print(USAGE)
            return 0
        if command in GROUPS:
            subcommands = " or ".join(n.split()[1] for n in COMMANDS if n.startswith(command))
            raise ConfigError(f"`folio {command}` needs a subcommand: {subcommands} (e.g. "
                              f"`folio {command} {subcommands.split()[0]} --help`)")
        if command not in COMMANDS:
            hint = config.nearest_key(command, list(COMMANDS)).replace("--", "")
            raise ConfigError(f"unknown command {command!r}{hint}")
        return run_command(command, rest)
    except FolioError as e:
        print(f"folio: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("folio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `folio sample | head`
        return 0


def run() -> NoReturn:
    """The `folio` console script and `python -m folio`: main(), then exit with its code.

    A torchrun worker leaves with os._exit once its output is flushed: its work is saved, and
    skipping interpreter teardown avoids an abort ("terminate called without an active
    exception") seen about once in ten runs when gloo's threads were torn down at exit."""
    code = main()
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
