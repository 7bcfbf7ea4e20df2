"""Settings: defaults < preset or config file (TOML / nanoGPT .py) < --key=value overrides."""

from __future__ import annotations

import dataclasses

import pytest

from folio.cli import main
from folio.cli.args import format_config, parse_args, parse_python_config
from folio.config import ChatConfig, PrepareConfig, SampleConfig, SamplingSettings, TrainConfig
from folio.errors import ConfigError
from folio.train.recipes import MODEL_SHAPE_KEYS, preset_names, resolve

NANOGPT_CONFIG = '''"""nanoGPT's config/train_shakespeare_char.py, trimmed."""
out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
wandb_log = False # override via command line if you like
dataset = 'shakespeare_char'
n_layer = 6
dropout = 0.2
learning_rate = 1e-3 # with baby networks can afford to go a bit higher
beta2 = 0.99
'''


def train(*argv: str) -> TrainConfig:
    return parse_args(TrainConfig, list(argv), config_file=True).config


def resolved(device: str, *argv: str) -> tuple[TrainConfig, str]:
    """What `folio train ARGV` trains on `device` (no run to resume)."""
    parsed = parse_args(TrainConfig, list(argv), config_file=True)
    return resolve(parsed.config, parsed.given, device, source=parsed.source)


def nanogpt(*argv: str) -> TrainConfig:
    """The settings ARGV gives, with nanoGPT's recipe: what a nanoGPT command line trains."""
    return dataclasses.replace(train(*argv), recipe="nanogpt")


def error(cls: type, *argv: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_args(cls, list(argv), config_file=cls is TrainConfig)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_defaults_are_valid_for_every_command():
    for cls in (TrainConfig, SampleConfig, PrepareConfig):
        assert parse_args(cls, []).config == cls()


def test_toml_config_file_then_overrides_win(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text('n_layer = 3\nn_head = 3\nn_embd = 96\ndataset = "mytext"\ncompile = false\n',
                    encoding="utf-8")
    cfg = train(str(path), "--n_layer=5")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dataset) == (5, 3, 96, "mytext")
    assert cfg.compile is False


def test_nanogpt_py_config_of_literal_assignments(tmp_path):
    path = tmp_path / "train_shakespeare_char.py"
    path.write_text(NANOGPT_CONFIG, encoding="utf-8")
    cfg = train(str(path), "--device=cpu", "--compile=False")
    assert (cfg.out_dir, cfg.eval_interval, cfg.n_layer) == ("out-shakespeare-char", 250, 6)
    assert (cfg.dropout, cfg.learning_rate, cfg.wandb_log) == (0.2, 1e-3, False)
    assert (cfg.device, cfg.compile) == ("cpu", False)


def test_py_config_with_code_is_refused_by_line_and_never_run(tmp_path):
    marker = tmp_path / "was_executed"
    path = tmp_path / "evil.py"
    path.write_text(f"n_layer = 2\nimport os\nopen({str(marker)!r}, 'w')\n", encoding="utf-8")
    message = error(TrainConfig, str(path))
    assert "evil.py line 2: only `name = literal` assignments are allowed" in message
    assert "`import os`" in message
    path.write_text(f"n_layer = 2\nwandb_run_name = open({str(marker)!r}, 'w')\n",
                    encoding="utf-8")
    assert "line 2" in error(TrainConfig, str(path))
    assert not marker.exists()


def test_py_config_syntax_error_names_the_line():
    with pytest.raises(ConfigError, match=r"cfg.py line 2: not valid Python"):
        parse_python_config("n_layer = 2\nn_head = = 3\n", "cfg.py")


def test_overrides_with_equals_or_space_are_the_same():
    assert train("--n_layer=3", "--out_dir=x") == train("--n_layer", "3", "--out_dir", "x")


@pytest.mark.parametrize("text, value", [
    ("True", True), ("False", False), ("true", True), ("false", False), ("1", True), ("0", False),
])
def test_booleans_accept_python_and_shell_spellings(text, value):
    assert train(f"--bias={text}").bias is value
    assert train("--bias", text).bias is value


def test_bare_flag_and_no_flag():
    assert train("--bias").bias is True
    assert train("--bias", "--no-bias").bias is False
    assert train("--bias", "--n_layer=2").n_layer == 2


def test_numbers_accept_nanogpt_spellings():
    cfg = train("--learning_rate=6e-4", "--max_iters=5e3", "--seed", "7")
    assert (cfg.learning_rate, cfg.max_iters, cfg.seed) == (6e-4, 5000, 7)
    assert parse_args(SampleConfig, ["--top_k=None"]).config.top_k is None


def test_sample_and_chat_list_the_shared_sampling_settings_after_their_own():
    names = [f.name for f in dataclasses.fields(SamplingSettings)]
    assert [f.name for f in dataclasses.fields(SampleConfig)] == [
        "out_dir", "start", "num_samples", *names, "compile", "stop", "stream"]
    assert [f.name for f in dataclasses.fields(ChatConfig)] == ["run_dir", "system", *names]
    sample, chat = SampleConfig(), ChatConfig(run_dir="run")
    assert [getattr(sample, k) for k in names[:4]] == [500, 0.8, 200, 1.0]
    assert [getattr(chat, k) for k in names[:4]] == [256, 0.7, 50, 1.0]
    with pytest.raises(ConfigError, match="device='gpu'"):
        ChatConfig(run_dir="run", device="gpu")


def test_repeatable_list_setting():
    cfg = parse_args(SampleConfig, ["--stop=\n\n", "--stop", "THE END"]).config
    assert cfg.stop == ["\n\n", "THE END"]


@pytest.mark.parametrize("argv, words", [
    (["--n_layers=3"], ["unknown setting --n_layers", "did you mean --n_layer?"]),
    (["--learningrate", "1e-3"], ["did you mean --learning_rate?"]),
    (["--zzzzzz=1"], ["unknown setting --zzzzzz", "see --help"]),
])
def test_unknown_key_names_the_nearest_key(argv, words):
    message = error(TrainConfig, *argv)
    for word in words:
        assert word in message


def test_unknown_key_in_a_config_file_names_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("n_layr = 2\n", encoding="utf-8")
    assert error(TrainConfig, str(path)) == (f"unknown setting 'n_layr' in {path}; did you mean "
                                             "--n_layer?")


@pytest.mark.parametrize("argv, words", [
    (["--n_layer=abc"], ["n_layer='abc'", "an integer"]),
    (["--n_layer=2.5"], ["n_layer='2.5'", "an integer"]),
    (["--bias=maybe"], ["bias='maybe'", "a boolean (True/False/1/0)"]),
    (["--compile=sometimes"], ["compile='sometimes'", "auto or a boolean"]),
    (["--learning_rate=fast"], ["learning_rate='fast'", "a number"]),
    (["--learning_rate=nan"], ["learning_rate=nan", "not a finite number"]),
    (["--dropout=1.5"], ["dropout=1.5", "too large", "<= 0.999"]),
    (["--n_layer=0"], ["n_layer=0", "too small", ">= 1"]),
    (["--learning_rate=0"], ["learning_rate=0.0", "must be > 0"]),
    (["--dtype=float8"], ["dtype='float8'", "expected one of auto, float32, bfloat16, float16"]),
    (["--device=tpu"], ["device='tpu'", "cpu, cuda, cuda:N or mps"]),
    (["--device=cuda:"], ["device='cuda:'", "cpu, cuda, cuda:N or mps"]),
    (["--n_embd=100", "--n_head=3"], ["n_embd=100", "n_head=3"]),
    (["--n_layer"], ["--n_layer needs a value"]),
])
def test_bad_value_names_key_value_and_expectation(argv, words):
    message = error(TrainConfig, *argv)
    for word in words:
        assert word in message, message


def test_wrong_type_in_toml_names_key_and_value(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('n_layer = "six"\n', encoding="utf-8")
    assert error(TrainConfig, str(path)) == "n_layer='six' is not an integer"
    path.write_text("n_layer = [\n", encoding="utf-8")
    assert "not valid TOML" in error(TrainConfig, str(path))


def test_prepare_takes_the_dataset_as_positional():
    cfg = parse_args(PrepareConfig, ["my.txt", "--tokenizer", "gpt2"]).config
    assert (cfg.dataset, cfg.tokenizer) == ("my.txt", "gpt2")
    assert "unexpected argument 'b.txt'" in error(PrepareConfig, "a.txt", "b.txt")


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_loads(name):
    cfg = train(name)
    assert cfg.dataset and cfg.out_dir


def test_nanogpt_config_paths_map_to_presets():
    assert train("config/train_shakespeare_char.py") == train("shakespeare_char")
    assert "no preset or config file named 'nope'" in error(TrainConfig, "nope")
    assert "config file missing.toml not found" in error(TrainConfig, "missing.toml")


def test_print_config_is_loadable_as_a_py_config(tmp_path, capsys):
    assert main(["train", "shakespeare_char", "--n_layer=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "n_layer = 3" in out.splitlines()
    path = tmp_path / "resolved.py"
    path.write_text(out, encoding="utf-8")
    assert train(str(path)) == nanogpt("shakespeare_char", "--n_layer=3")
    assert format_config(train(str(path))) == out.strip()


def test_help_lists_every_key_with_its_default(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name} " in out
    assert "[default: 1337]" in out


@pytest.mark.parametrize("argv", [["train", "--n_layers=3"], ["sample", "--top_k=-1"],
                                  ["prepare", "--val_fraction=2"], ["trian"]])
def test_cli_config_errors_are_one_line_with_exit_code_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("folio: error: ") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- given settings

def test_the_parser_returns_the_names_the_user_gave(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("n_layer = 3\nn_head = 2\n", encoding="utf-8")
    parsed = parse_args(TrainConfig, [str(path), "--n_embd=96", "--no-bias"], config_file=True)
    assert parsed.given == {"n_layer", "n_head", "n_embd", "bias"}
    given_default = parse_args(TrainConfig, ["--n_layer=12"])
    assert given_default.given == {"n_layer"}  # given, even when it is the default
    assert given_default.config == TrainConfig()


def test_model_shape_keys_are_the_model_configs_fields():
    from folio.model.gpt import IMPORTED_SHAPE, GPTConfig
    fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size", "dropout"}
    fields -= set(IMPORTED_SHAPE)
    assert set(MODEL_SHAPE_KEYS) == fields


# ---------------------------------------------------------------------------- device defaults

SEED_MPS_LINE = ["--dataset=shakespeare", "--n_layer=4", "--n_head=4", "--n_embd=64",
                 "--block_size=64", "--batch_size=8", "--max_iters=2000", "--device=mps",
                 "--compile=False"]


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_bare_train_on_a_gpu_gets_the_gpu_preset_and_says_so(device):
    cfg, note = resolved(device, f"--device={device}", "--dtype=float32")
    preset = train("shakespeare_char", f"--device={device}", "--dtype=float32")
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.max_iters, cfg.out_dir) == \
        (preset.n_layer, preset.n_embd, preset.block_size, preset.max_iters, preset.out_dir)
    assert cfg.recipe == "modern" and cfg.optimizer == "muon"  # folio chose: the modern recipe
    assert "shakespeare_char" in note and device in note and "6 layers" in note
    cfg, _ = resolved(device, "--out_dir=mine", "--init_from=resume")
    assert (cfg.n_layer, cfg.out_dir, cfg.init_from) == (6, "mine", "resume")  # given: kept


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_any_model_or_training_setting_means_nanogpts_defaults(device):
    seed = nanogpt(*SEED_MPS_LINE)
    assert resolved(device, *SEED_MPS_LINE) == (seed, "")
    # what nanoGPT's train.py would use for the settings the line leaves out
    assert (seed.dropout, seed.learning_rate, seed.out_dir, seed.beta2, seed.warmup_iters,
            seed.min_lr, seed.eval_interval, seed.log_interval) == \
        (0.0, 6e-4, "out", 0.95, 2000, 6e-5, 2000, 1)
    for argv in (["--max_iters=100"], ["--dataset=mytext"], ["--init_from=gpt2"],
                 ["shakespeare_char_cpu"]):
        assert resolved(device, *argv) == (nanogpt(*argv), ""), argv


def test_bare_train_on_a_cpu_gets_the_readme_cpu_model_and_says_so():
    cfg, note = resolved("cpu", "--device=cpu")
    assert (cfg.n_layer, cfg.n_embd, cfg.max_iters) == (4, 128, 2000)
    assert cfg.recipe == "modern" and cfg.learning_rate == 0.01  # the recipe's, not the preset's
    assert "shakespeare_char_cpu" in note and "4 layers" in note


def test_lr_decay_iters_follows_max_iters_unless_given():
    from folio.train.optim import lr_at
    cfg = train("--max_iters=1000", "--warmup_iters=0", "--min_lr=1e-5")
    assert lr_at(1000, cfg) == pytest.approx(1e-5) and lr_at(500, cfg) > 2e-4
    cfg = train("--max_iters=1000", "--warmup_iters=0", "--min_lr=1e-5", "--lr_decay_iters=500")
    assert lr_at(500, cfg) == pytest.approx(1e-5)


def test_a_resumed_run_takes_the_checkpoints_shape_unless_one_was_given():
    from folio.store.rundir import RunInfo
    saved = RunInfo(model={"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16,
                           "tie_head": True}, tokenizer={}, config={"recipe": "nanogpt"})
    parsed = parse_args(TrainConfig, ["--init_from=resume", "--max_iters=10"])
    cfg, _ = resolve(parsed.config, parsed.given, "cpu", saved)
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.tie_head) == (2, 32, 16, True)
    parsed = parse_args(TrainConfig, ["--init_from=resume", "--n_layer=3"])
    with pytest.raises(Exception, match="cannot resume: n_layer=3 but the checkpoint"):
        resolve(parsed.config, parsed.given, "cpu", saved)
