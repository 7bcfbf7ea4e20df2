"""Every command parses through one mechanism: --help, --print-config, positionals, errors."""

from __future__ import annotations

import dataclasses

import pytest

from folio import config
from folio.cli import main
from folio.cli.args import parse_args, parse_python_config
from folio.cli.main import COMMANDS
from folio.config import ExportConfig, ImportNanoGPTConfig, PlotConfig
from folio.errors import ConfigError

# the bare arguments each command needs before --print-config can resolve its settings
NEEDED = {"plot": ["run"], "export": ["run", "hf-out"], "import-nanogpt": ["out", "run"],
          "tokenizer train": ["notes"], "tokenizer eval": ["tok", "notes"], "eval": ["run"],
          "chat": ["run"], "report": ["run"]}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_lists_every_setting_with_its_default(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: folio {name} ")
    cls = COMMANDS[name].settings
    lines = {f.name: next(line for line in out.splitlines() if f"--{f.name} " in line)
             for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        want = "[required]" if f.metadata["required"] else f"[default: {default!r}]"
        assert lines[f.name].endswith(want), lines[f.name]
        assert f.metadata["positional"] in lines[f.name]  # "" for settings that are not bare


@pytest.mark.parametrize("name", list(COMMANDS))
def test_print_config_resolves_every_command_without_running_it(name, capsys, tmp_path,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([name, *NEEDED.get(name, []), "--print-config"]) == 0
    values = parse_python_config(capsys.readouterr().out)
    cls = COMMANDS[name].settings
    assert list(values) == [f.name for f in dataclasses.fields(cls)]
    parsed = parse_args(cls, NEEDED.get(name, []))
    resolve = COMMANDS[name].resolve  # train: with the defaults the device decides
    assert config.apply(cls, values) == (resolve(parsed).settings if resolve else parsed.config)
    assert list(tmp_path.iterdir()) == []


def test_export_keeps_its_command_line_forms():
    want = ExportConfig(run_dir="run", out_dir="hf", format="hf", force=True)
    for argv in (["run", "--format", "hf", "hf", "--force"], ["run", "--format=hf", "hf",
                                                               "--force"],
                 ["--force", "run", "hf"], ["--run_dir=run", "--out_dir", "hf", "--force"]):
        assert parse_args(ExportConfig, argv).config == want, argv


def test_import_nanogpt_takes_source_and_destination_in_order():
    cfg = parse_args(ImportNanoGPTConfig, ["out", "--meta", "m.pkl", "run"]).config
    assert (cfg.nanogpt_out_dir, cfg.run_dir, cfg.meta, cfg.dataset) == ("out", "run", "m.pkl",
                                                                        "")


def test_plot_takes_any_number_of_inputs_and_short_output():
    cfg = parse_args(PlotConfig, ["a", "b", "-o", "p.png", "--logy", "-", "--x", "tokens"]).config
    assert cfg.inputs == ["a", "b", "-"] and cfg.output == "p.png"
    assert (cfg.logy, cfg.x, cfg.smooth) == (True, "tokens", None)
    assert parse_args(PlotConfig, ["-o=p.png", "a"]).config.output == "p.png"
    assert parse_args(PlotConfig, ["--", "--odd-name"]).config.inputs == ["--odd-name"]


@pytest.mark.parametrize("cls, argv, words", [
    (PlotConfig, [], ["missing RUN_DIR|LOGFILE|-"]),
    (PlotConfig, ["a", "-z"], ["unknown option -z", "--key=value"]),
    (PlotConfig, ["a", "--smooth", "0"], ["smooth=0", ">= 1"]),
    (PlotConfig, ["a", "--x", "epochs"], ["x='epochs'", "iter, tokens, time"]),
    (ExportConfig, ["run"], ["missing OUT_DIR"]),
    (ExportConfig, ["run", "o", "extra"], ["unexpected argument 'extra'"]),
    (ExportConfig, ["run", "o", "--format", "onnx"], ["format='onnx'", "hf"]),
    (ExportConfig, ["--run_dir=a", "b", "c"], ["RUN_DIR given twice", "'b'", "--run_dir=a"]),
    (ImportNanoGPTConfig, ["out"], ["missing RUN_DIR"]),
    (ImportNanoGPTConfig, ["out", "run", "--metta=x"], ["did you mean --meta?"]),
])
def test_bad_command_lines_name_what_is_wrong(cls, argv, words):
    with pytest.raises(ConfigError) as e:
        parse_args(cls, argv)
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value), str(e.value)


@pytest.mark.parametrize("argv", [["plot"], ["export", "run"], ["import-nanogpt", "out"],
                                  ["bench", "--cases", "nope"], ["plot", "a", "-z"],
                                  ["bench", "--steps=-1"]])
def test_command_errors_are_one_line_with_exit_code_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("folio: error: ") and len(err.strip().splitlines()) == 1


def test_settings_classes_validate_their_fields_on_construction():
    from folio.config import SampleConfig, TrainConfig
    with pytest.raises(ConfigError, match="n_layer=0 is too small"):
        TrainConfig(n_layer=0)
    with pytest.raises(ConfigError, match="top_k=0 is too small"):
        SampleConfig(top_k=0)
    with pytest.raises(ConfigError, match="missing RUN_DIR"):
        ExportConfig(out_dir="hf")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_records_exactly_the_settings_given(name):
    """The parser returns the names the command line set, even a value equal to the
    default, and nothing else."""
    cls = COMMANDS[name].settings
    required = {f.name for f in dataclasses.fields(cls) if f.metadata["required"]}
    assert parse_args(cls, NEEDED.get(name, [])).given == required
    field = next(f for f in dataclasses.fields(cls)
                 if not f.metadata["required"] and isinstance(f.default, str))
    parsed = parse_args(cls, [*NEEDED.get(name, []), f"--{field.name}={field.default}"])
    assert getattr(parsed.config, field.name) == field.default
    assert parsed.given == required | {field.name}
