"""Typed settings for every command: one dataclass each, a help line and range checks per
field, validated on construction. The command line that fills them is cli/args.py; the
defaults that depend on what was given and on the device are resolved once, by
train/recipes.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from folio.errors import ConfigError

AUTO = "auto"


def setting(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
            max: float | None = None, above: float | None = None, positional: str = "",
            required: bool = False, short: str = "") -> Any:
    """A dataclass field with a one-line help text and optional range checks.

    `positional` (a metavar, e.g. "RUN_DIR") lets a bare argument fill the field as well as
    `--name`; bare arguments fill such fields in order, and a list field takes all the rest.
    `required` fields must be given (a non-empty value); `short` is a one-letter alias (`-o`).
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "above": above,
            "positional": positional, "required": required, "short": short}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def changed(cls: type, name: str, default: Any, help: str = "") -> Any:
    """The setting `name` of the settings class `cls`, with another default (and help text):
    a class built on `cls` redeclares it so (it keeps its place in --help)."""
    meta = cls.__dataclass_fields__[name].metadata
    return setting(default, **{**meta, "help": help or meta["help"]})


def settings(cls: type) -> type:
    """`@dataclass` whose fields are validated on construction (`validate_fields`, unless the
    class has or inherits a `__post_init__`)."""
    if not hasattr(cls, "__post_init__"):
        cls.__post_init__ = lambda self: validate_fields(self)  # defined further down
    return dataclass(cls)


@settings
class TrainConfig:
    """Everything `folio train` reads. Names, meanings and defaults follow nanoGPT's train.py,
    except: max_iters is finite, lr_decay_iters follows it, gradient_accumulation_steps is 1,
    and device, dtype and compile are chosen for the machine (auto)."""

    # I/O
    out_dir: str = setting("out", "run directory: weights, state, metrics.jsonl, loss.png")
    eval_interval: int = setting(2000, "evaluate train/val loss every this many iterations; 0 "
                                 "(with --time): at each tenth of the budget", min=0)
    log_interval: int = setting(1, "print a progress line every this many iterations", min=1)
    eval_iters: int = setting(200, "batches per split when estimating the loss", min=1)
    eval_only: bool = setting(False, "evaluate once and exit")
    always_save_checkpoint: bool = setting(True, "save at every eval, not only when val improves")
    init_from: str = setting("scratch", "scratch | resume | gpt2[-medium|-large|-xl] | a Hugging "
                             "Face model dir (GPT-2, Llama/SmolLM2, Qwen3, Apertus, Arcee; "
                             "prepare the data with --tokenizer=hf:DIR) | a hub id such as "
                             "HuggingFaceTB/SmolLM2-135M (HF cache, else downloaded) | a folio "
                             "run dir (finetune its weights)")
    task: str = setting("lm", "lm: next-token loss on every token; chat: supervised "
                        "finetuning on a --format=chat dataset, the loss on the assistant's "
                        "tokens only", choices=("lm", "chat"))
    overwrite: bool = setting(False, "let a fresh run replace the run already saved in out_dir")
    seed: int = setting(1337, "random seed (each DDP rank adds its rank)", min=0)
    # logging
    wandb_log: bool = setting(False, "log metrics to Weights & Biases (pip install folio[wandb])")
    wandb_project: str = setting("folio", "wandb project name")
    wandb_run_name: str = setting("run", "wandb run name")
    tensorboard: bool = setting(False, "write TensorBoard event files into out_dir")
    report: bool = setting(True, "write the report card (report.html, report.md, with a few "
                           "samples) into out_dir when training ends")
    # data
    dataset: str = setting("openwebtext", "prepared dataset name under data_dir")
    data_dir: str = setting("data", "where prepared datasets live")
    gradient_accumulation_steps: int = setting(1, "micro-steps per iteration (global, all ranks)",
                                               min=1)
    batch_size: int = setting(12, "sequences per micro-step per process", min=1)
    block_size: int = setting(1024, "context length in tokens", min=1)
    # model
    n_layer: int = setting(12, "transformer blocks", min=1)
    n_head: int = setting(12, "attention heads per block", min=1)
    n_embd: int = setting(768, "embedding width (divisible by n_head)", min=1)
    dropout: float = setting(0.0, "dropout probability", min=0.0, max=0.999)
    bias: bool = setting(False, "use biases in Linear and LayerNorm layers")
    rope: bool = setting(False, "rotary position embeddings instead of a learned position table")
    norm: str = setting("layernorm", "normalisation layers", choices=("layernorm", "rmsnorm"))
    qk_norm: bool = setting(False, "RMS-normalise queries and keys per head")
    mlp: str = setting("gelu", "MLP activation (swiglu: Llama's gated SiLU; xielu: Apertus')",
                       choices=("gelu", "relu2", "swiglu", "xielu"))
    tie_head: bool | str = setting(AUTO, "share the output head's weights with the token "
                                   "embedding; auto: tied, except the modern recipe unties a "
                                   "head that does not outweigh the blocks")
    logit_softcap: float = setting(0.0, "soft-cap logits at this value (cap*tanh(x/cap)); 0: off",
                                   min=0.0)
    zero_init_proj: bool = setting(False, "start attention and MLP output projections at zero")
    recipe: str = setting(AUTO, "modern: the speedrun bundle (rope, rmsnorm, qk_norm, relu2, "
                          "untied head, Muon, wsd) for settings not given; nanogpt: nanoGPT's; "
                          "auto: modern where folio chooses the settings (a bare folio train, "
                          "--time, folio's presets), nanogpt where they come from nanoGPT (its "
                          "command lines, config files and presets)",
                          choices=(AUTO, "nanogpt", "modern"))
    # optimizer
    learning_rate: float = setting(6e-4, "peak learning rate", above=0.0)
    max_iters: int | None = setting(5000, "total training iterations (nanoGPT: 600,000); None: "
                                    "no limit but the time budget", min=0)
    time: str = setting("", "wall-clock budget, e.g. 90s, 10m, 1.5h: the schedule ends at the "
                        "deadline with a finished model; whichever of time and max_iters ends "
                        "first")
    weight_decay: float = setting(1e-1, "decoupled weight decay on 2-D parameters (AdamW's and "
                                  "Muon's)", min=0.0)
    beta1: float = setting(0.9, "AdamW beta1", min=0.0, max=0.999999)
    beta2: float = setting(0.95, "AdamW beta2", min=0.0, max=0.999999)
    grad_clip: float = setting(1.0, "clip gradient norm at this value; 0 disables", min=0.0)
    optimizer: str = setting("adamw", "adamw | muon (Muon for block matrices, AdamW for the "
                             "rest)", choices=("adamw", "muon"))
    muon_lr: float = setting(0.02, "Muon's peak learning rate (optimizer=muon)", above=0.0)
    muon_momentum: float = setting(0.95, "Muon's momentum after its warmup", min=0.0, max=0.999)
    muon_momentum_warmup: int = setting(300, "iterations Muon's momentum warms up from 0.85",
                                        min=0)
    embed_lr: float | None = setting(None, "AdamW peak lr of embeddings (optimizer=muon); "
                                     "None: learning_rate", above=0.0)
    head_lr: float | None = setting(None, "AdamW peak lr of the output head (optimizer=muon); "
                                    "None: learning_rate", above=0.0)
    # learning rate schedule
    decay_lr: bool = setting(True, "warmup then cosine decay; False keeps learning_rate")
    lr_schedule: str = setting("cosine", "cosine | wsd (warmup, constant, linear warmdown)",
                               choices=("cosine", "wsd"))
    warmdown_frac: float = setting(0.5, "wsd: fraction of lr_decay_iters spent in the warmdown",
                                   min=0.0, max=1.0)
    warmup_iters: int = setting(2000, "linear warmup iterations", min=0)
    lr_decay_iters: int | None = setting(None, "iteration where the cosine reaches min_lr; "
                                          "None: max_iters", min=1)
    min_lr: float = setting(6e-5, "learning rate floor", min=0.0)
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
        if self.time:
            parse_duration(self.time)  # a one-line error for a bad budget
        if self.max_iters is None and not self.time:
            raise ConfigError("max_iters=None needs a --time budget; give --max_iters=N or "
                              "--time=10m")
        if self.eval_interval == 0 and not self.time:
            raise ConfigError("eval_interval=0 (ten evaluations spread over the budget) needs "
                              "--time; give --eval_interval=N or --time=10m")
        if self.time and self.eval_only:
            raise ConfigError("--time and --eval_only do not go together: an evaluation has no "
                              "budget to plan; drop --time")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                              "pick n_embd as a multiple of n_head")
        check_device_name(self.device)


@settings
class SamplingSettings:
    """The settings `folio sample` and `folio chat` share, with sample's defaults. A command's
    class lists these after its own leading settings by naming this class before the class of
    those (a dataclass takes its bases' fields from the last base to the first)."""

    max_new_tokens: int = setting(500, "tokens generated per sample", min=1)
    temperature: float = setting(0.8, "softmax temperature; 0 is greedy", min=0.0)
    top_k: int | None = setting(200, "keep the k most likely tokens; None keeps all", min=1)
    top_p: float = setting(1.0, "nucleus sampling: keep the smallest set with this mass",
                           above=0.0, max=1.0)
    seed: int = setting(1337, "random seed", min=0)
    device: str = setting(AUTO, "auto | cpu | cuda | cuda:N | mps")
    dtype: str = setting(AUTO, "compute dtype", choices=(AUTO, "float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        validate_fields(self)
        check_device_name(self.device)


@settings
class SampleLead:
    """The settings `folio sample` lists before SamplingSettings."""

    out_dir: str = setting("out", "run directory to sample from (folio or nanoGPT)",
                           positional="RUN_DIR")
    start: str = setting("\n", "prompt text, or FILE:path to read it from a file")
    num_samples: int = setting(10, "number of samples", min=1)


@settings
class SampleConfig(SamplingSettings, SampleLead):
    """Everything `folio sample` reads. Names and meanings follow nanoGPT's sample.py."""

    compile: bool = setting(False, "torch.compile the model")
    stop: list[str] = setting([], "stop a sample at this string (repeatable)")
    stream: bool = setting(True, "print tokens as they are generated")


@settings
class PrepareConfig:
    """Everything `folio prepare` reads: a dataset tokenized into train.bin, val.bin and
    meta.json under data_dir."""

    dataset: str = setting("shakespeare_char", "shakespeare_char | shakespeare | openwebtext | "
                           "fineweb-edu | hf:NAME[:CONFIG] | PATH (.txt, .jsonl[.gz|.zst], "
                           ".parquet, a directory or glob of text files)",
                           positional="DATASET|PATH")
    tokenizer: str = setting(AUTO, "char | gpt2 | tiktoken:NAME | hf:PATH (a local Hugging Face "
                             "tokenizer dir) | DIR (one `folio tokenizer train` wrote); auto: "
                             "gpt2 for hub datasets and shakespeare, char for files")
    include: list[str] = setting([], "read only a folder's (or glob's) files matching this glob, "
                                 "e.g. '*.md' (repeatable)")
    exclude: list[str] = setting([], "leave out a folder's files matching this glob, e.g. "
                                 "'build/*' (repeatable)")
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
    format: str = setting("text", "text: documents; chat: conversations, a .jsonl of "
                          "{\"messages\": [{\"role\", \"content\"}, ...]} lines or hf:NAME with a "
                          "messages field (--text_field), with a mask of the assistant's tokens; "
                          "--tokenizer=RUN_DIR takes a run's vocabulary", choices=("text", "chat"))
    num_proc: int = setting(0, "tokenizer processes; 0: one per core for large inputs", min=0)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.val_fraction is not None and self.val_fraction >= 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} is too large; expected a "
                              "number between 0 and 1 (exclusive), e.g. 0.1")
        check_tokenizer_choice(self.tokenizer)


@settings
class PlotConfig:
    """Everything `folio plot` reads: loss curves of runs or of pasted nanoGPT/folio logs."""

    inputs: list[str] = setting([], "run dirs, metrics.jsonl files or console logs (- reads a "
                                "pasted log from stdin)", positional="RUN_DIR|LOGFILE|-",
                                required=True)
    output: str = setting("", "PNG path (default: RUN_DIR/loss.png for one run dir, else "
                          "./loss.png)", short="o")
    html: str = setting("", "also write an interactive self-contained HTML file here")
    x: str = setting("iter", "x axis", choices=("iter", "tokens", "time"))
    metric: str = setting("loss", "y axis: loss (cross-entropy per token) or bpb (bits per "
                          "byte at each eval: compares across tokenizers)",
                          choices=("loss", "bpb"))
    logy: bool = setting(False, "log-scale loss axis")
    smooth: int | None = setting(None, "EMA span in log points for the smoothed train curve "
                                 "(None: about 1/30 of the curve; 1: no smoothing)", min=1)


@settings
class ReportConfig:
    """Everything `folio report` reads: one self-contained HTML page (and a markdown twin)
    for one run or several compared: machine, versions, settings, time, tokens, FLOPs,
    throughput, fast path, curves, best val, evaluations and samples."""

    run_dirs: list[str] = setting([], "run dirs written by `folio train`", positional="RUN_DIR",
                                  required=True)
    out: str = setting("", "HTML path (default: RUN_DIR/report.html for one run, else "
                       "./report.html); the markdown goes beside it as .md", short="o")
    x: str = setting("iter", "x axis of the curves", choices=("iter", "tokens", "time", "flops"))
    samples: bool = setting(True, "sample the fixed prompts from each run's best weights when "
                            "its samples.json is missing or older than them")


# the 256 byte tokens and the special tokens (data/bpe_files.py's SPECIAL_TOKENS)
MIN_BPE_VOCAB = 256 + 5
MAX_BPE_VOCAB = 1 << 32  # token ids are stored as uint32


@settings
class TokenizerTrainConfig:
    """Everything `folio tokenizer train` reads: a byte-level BPE trained on your text (any
    source folio prepare reads), saved as a directory for `folio prepare --tokenizer=DIR`."""

    source: str = setting("", "text to train on: a file, folder or glob of text files, "
                          ".jsonl[.gz|.zst], .parquet, hf:NAME[:CONFIG], shakespeare",
                          positional="SOURCE", required=True)
    vocab_size: int = setting(8192, "tokens in the vocabulary: 256 bytes, the merges and 5 "
                              "special tokens (<|endoftext|>, <|system|>, <|user|>, "
                              "<|assistant|>, <|end|>)", min=MIN_BPE_VOCAB, max=MAX_BPE_VOCAB)
    out: str = setting("", "directory to write (default: tokenizers/NAME-VOCAB_SIZE)")
    overwrite: bool = setting(False, "replace a tokenizer already in --out")
    pattern: str = setting("gpt4", "split pattern applied before merging", choices=("gpt4", "gpt2"))
    max_chars: int = setting(0, "train on the first this many characters; 0: all", min=0)
    text_field: str = setting("text", "the text's field in .jsonl / .parquet / hub records")
    split: str = setting("train", "hub dataset split to read")
    keep_newlines: bool = setting(False, "keep \\r\\n and \\r line endings (default: made \\n)")
    include: list[str] = setting([], "read only a folder's files matching this glob (repeatable)")
    exclude: list[str] = setting([], "leave out a folder's files matching this glob (repeatable)")


@settings
class TokenizerEvalConfig:
    """Everything `folio tokenizer eval` reads: bytes per token of a trained tokenizer on some
    text, beside GPT-2's and the text's own characters'."""

    tokenizer_dir: str = setting("", "directory `folio tokenizer train` wrote", positional="DIR",
                                 required=True)
    source: str = setting("", "text to measure on (any source folio prepare reads)",
                          positional="SOURCE", required=True)
    max_chars: int = setting(0, "measure on the first this many characters; 0: all", min=0)
    text_field: str = setting("text", "the text's field in .jsonl / .parquet / hub records")
    split: str = setting("train", "hub dataset split to read")
    keep_newlines: bool = setting(False, "keep \\r\\n and \\r line endings (default: made \\n)")
    include: list[str] = setting([], "read only a folder's files matching this glob (repeatable)")
    exclude: list[str] = setting([], "leave out a folder's files matching this glob (repeatable)")


@settings
class EvalConfig:
    """Everything `folio eval` reads: a run's loss and bits per byte on a fixed number of
    tokens of any text or prepared dataset, with 95% confidence intervals."""

    run_dir: str = setting("", "run directory to evaluate (folio, nanoGPT or Hugging Face)",
                           positional="RUN_DIR", required=True)
    data: str = setting("", "what to score: a prepared dataset dir (its --split), or any text "
                        "folio prepare reads (a file, folder, glob, .jsonl, .parquet, hf:NAME), "
                        "encoded with the run's tokenizer; default: the run's dataset")
    split: str = setting("val", "split of a prepared dataset", choices=("val", "train"))
    tokens: int = setting(1 << 18, "targets scored, from the start (fewer if the text is "
                          "shorter; of a chat dataset, the assistant's among them): the same "
                          "number makes runs compare", min=1)
    device: str = setting(AUTO, "auto | cpu | cuda | cuda:N | mps")
    dtype: str = setting("float32", "compute dtype", choices=(AUTO, "float32", "bfloat16",
                                                              "float16"))
    text_field: str = setting("text", "the text's field in .jsonl / .parquet / hub records")
    include: list[str] = setting([], "read only a folder's files matching this glob (repeatable)")
    exclude: list[str] = setting([], "leave out a folder's files matching this glob (repeatable)")
    tasks: str = setting("", "lm-evaluation-harness tasks instead of the bits per byte "
                         "(also those with --data): comma-separated names (hellaswag, "
                         "arc_easy, ...; `lm-eval ls tasks`) or task dirs / YAML files")
    limit: int = setting(0, "--tasks: examples per task (0: all)", min=0)
    num_fewshot: int = setting(-1, "--tasks: few-shot examples in each prompt (-1: each task's "
                               "own)", min=-1)
    batch_size: int = setting(8, "--tasks: requests per forward pass", min=1)

    def __post_init__(self) -> None:
        validate_fields(self)
        check_device_name(self.device)


@settings
class BenchConfig:
    """Everything `folio bench` reads: CPU training speed, nanoGPT's plain eager float32 path
    against folio's default path, each in its own process, taking turns."""

    cases: str = setting("all", "comma-separated case names (see cases above), or all")
    steps: int = setting(0, "timed steps per path (0: each case's own number)", min=0)
    quality: bool = setting(False, "also train cpu_char for quality_iters iterations on both "
                            "paths and compare the final val loss")
    quality_iters: int = setting(2000, "iterations of the --quality comparison", min=1)
    variants: str = setting("eager,fast", "paths to run: eager, fast, or one with knobs "
                            "changed, e.g. fast:fused_loss=0; ratios use the first two")
    data_dir: str = setting("", "where tiny Shakespeare is prepared (default: under "
                            "FOLIO_CACHE)")


@settings
class ExportConfig:
    """Everything `folio export` reads: a run written, with its tokenizer, as a standard Hugging
    Face transformers model (GPT-2, Apertus or Arcee) or as a GGUF file for llama.cpp and Ollama
    (with a Modelfile beside it)."""

    run_dir: str = setting("", "folio run dir (or nanoGPT out dir with ckpt.pt)",
                           positional="RUN_DIR", required=True)
    out_dir: str = setting("", "hf: the directory to write; gguf: the FILE.gguf to write (an "
                           "Ollama Modelfile goes beside it)", positional="OUT_DIR", required=True)
    format: str = setting("hf", "hf: a transformers dir (GPT-2 for the nanoGPT recipe, "
                          "Apertus/Arcee for rotary RMSNorm models) with tokenizer.json; gguf: "
                          "one file for llama.cpp/Ollama (gpt2, apertus or arcee: formats above)",
                          choices=("hf", "gguf"))
    dtype: str = setting("f32", "weights: f32, f16 or bf16 (hf and gguf), q8_0 (gguf)",
                         choices=("f32", "f16", "bf16", "q8_0"))
    force: bool = setting(False, "replace a non-empty OUT_DIR (gguf: the file and Modelfile)")


@settings
class ImportNanoGPTConfig:
    """Everything `folio import-nanogpt` reads: a nanoGPT out dir (ckpt.pt, optional char
    meta.pkl) converted into a folio run dir; nothing is unpickled beyond plain data."""

    nanogpt_out_dir: str = setting("", "nanoGPT out dir holding ckpt.pt",
                                   positional="NANOGPT_OUT_DIR", required=True)
    run_dir: str = setting("", "folio run dir to create", positional="RUN_DIR", required=True)
    meta: str = setting("", "char-level meta.pkl (default: beside ckpt.pt, then "
                        "data/<dataset>/meta.pkl)")
    dataset: str = setting("", "dataset name for finding meta.pkl (default: from ckpt.pt's "
                           "config)")


@settings
class ChatLead:
    """The settings `folio chat` lists before SamplingSettings."""

    run_dir: str = setting("", "run directory of a chat model", positional="RUN_DIR",
                           required=True)
    system: str = setting("", "system message the conversation starts with")


@settings
class ChatConfig(SamplingSettings, ChatLead):
    """Everything `folio chat` reads: a terminal chat with a run finetuned with --task=chat
    (its chat template); /reset starts over, /system TEXT sets the system message, /quit or
    end of input leaves."""

    max_new_tokens: int = changed(SamplingSettings, "max_new_tokens", 256,
                                  "longest reply in tokens")
    temperature: float = changed(SamplingSettings, "temperature", 0.7)
    top_k: int | None = changed(SamplingSettings, "top_k", 50)


@settings
class ServeConfig:
    """Everything `folio serve` reads: which runs to show and serve, where, and the limits."""

    run_dirs: list[str] = setting([], "run directories to serve (each one a model)",
                                  positional="RUN_DIR")
    runs_dir: str = setting("", "also serve every run directory under this directory "
                            "(default: . when no run dir is given)")
    host: str = setting("127.0.0.1", "address to listen on; 0.0.0.0 exposes the server")
    port: int = setting(8000, "TCP port to listen on", min=0, max=65535)
    api_key: str = setting("", "require `Authorization: Bearer KEY` on every API route")
    cors_origin: str = setting("", "allow browser pages of this origin to call the API")
    device: str = setting(AUTO, "auto | cpu | cuda | cuda:N | mps")
    dtype: str = setting(AUTO, "compute dtype", choices=(AUTO, "float32", "bfloat16", "float16"))
    max_models: int = setting(2, "models kept loaded; the least recently used is unloaded",
                              min=1)
    max_active: int = setting(8, "requests decoded at once (their choices side by side)",
                              min=1)
    batch: bool = setting(True, "decode the active requests in one forward pass per step; "
                          "false: one token per request in turn (slower, for comparison)")
    queue_size: int = setting(32, "generations waiting beyond max_active; more answer 429",
                              min=0)
    max_tokens: int = setting(1024, "largest max_tokens a request may ask for", min=1)
    max_prompt_chars: int = setting(32768, "longest prompt (or joined chat) in characters",
                                    min=1)
    max_n: int = setting(4, "largest n (completions per request)", min=1)
    max_body_bytes: int = setting(1 << 20, "largest request body in bytes", min=1024)
    strict_template: bool = setting(False, "answer a chat request to a run without a chat "
                                    "template with 400 instead of joining the turns into a "
                                    "script for a base model")

    def __post_init__(self) -> None:
        validate_fields(self)
        check_device_name(self.device)


Config = TypeVar("Config", TrainConfig, SampleConfig, PrepareConfig, PlotConfig, BenchConfig,
                 ExportConfig, ImportNanoGPTConfig, ServeConfig, TokenizerTrainConfig,
                 TokenizerEvalConfig, EvalConfig, ChatConfig)


# ---------------------------------------------------------------------------- validation

DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a budget like '90s', '10m', '1.5h' (a bare number is seconds)."""
    value, unit = text.strip(), "s"
    if value and value[-1].lower() in DURATION_UNITS:
        value, unit = value[:-1], value[-1].lower()
    try:
        seconds = float(value) * DURATION_UNITS[unit]
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"time={text!r} is not a positive duration; use e.g. --time=90s, "
                          "--time=10m or --time=1.5h")
    return seconds


def check_tokenizer_choice(choice: str) -> None:
    """auto, char, gpt2, tiktoken:NAME, hf:PATH, or a directory (a path: it has a separator or
    exists) of a tokenizer `folio tokenizer train` wrote."""
    kind, _, arg = choice.partition(":")
    named = choice in (AUTO, "char", "gpt2") or (kind in ("tiktoken", "hf") and arg)
    if not named and not ("/" in choice or os.sep in choice or os.path.isdir(choice)):
        raise ConfigError(f"tokenizer={choice!r} is not allowed; expected one of auto, char, "
                          "gpt2, tiktoken:NAME, hf:PATH or the DIR of a trained tokenizer "
                          "(folio tokenizer train)")


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
        if m["required"] and value in ("", []):
            raise ConfigError(f"missing {m['positional'] or '--' + f.name}: {m['help']}")
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


# ---------------------------------------------------------------------------- building

def nearest_key(key: str, keys: list[str]) -> str:
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f"; did you mean --{match[0]}?" if match else "; see --help for the valid keys"


def apply(cls: type[Config], values: dict[str, Any], base: Config | None = None,
          origin: str = "") -> Config:
    """A new config with `values` applied over `base` (or the defaults), fully validated; an
    unknown key is a one-line error naming the nearest valid one (and `origin`, a file)."""
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
