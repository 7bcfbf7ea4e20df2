"""Every mistake a user can make gets one line on stderr, a non-zero exit and no debris.

One parametrised test drives each case through `folio.cli.main` in this process (what the
`folio` command runs); one smoke test runs the real `folio` entry point in a process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import tiny_args

from folio.cli import main


@dataclass
class Env:
    tmp: Path  # scratch space for this case
    data: Path  # a private copy of a prepared char dataset dir (data_dir)
    run: Path  # a private copy of a trained tiny run dir


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    expect: str  # a fragment the error line must contain


def train(env: Env, *extra: str, out: str = "out") -> list[str]:
    return ["train", *tiny_args(env.data, env.tmp / out, max_iters=2), *extra]


def sample(env: Env, *extra: str) -> list[str]:
    return ["sample", f"--out_dir={env.run}", "--max_new_tokens=5", "--num_samples=1",
            "--device=cpu", *extra]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def corrupt(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def shakespeare(env: Env) -> Path:
    return env.data / "shakespeare_char"


CASES = [
    # ---- prepare
    Case("prepare_missing_path", lambda e: ["prepare", str(e.tmp / "nope.txt")], "does not exist"),
    Case("prepare_empty_file", lambda e: ["prepare", str(write(e.tmp / "empty.txt", "")),
                                          f"--data_dir={e.tmp / 'd'}"], "empty"),
    Case("prepare_not_utf8", lambda e: ["prepare", str(write(e.tmp / "latin1.txt",
                                                             "caf\xe9 ok".encode("latin-1"))),
                                        f"--data_dir={e.tmp / 'd'}"], "byte"),
    Case("prepare_unknown_dataset", lambda e: ["prepare", "shakespear"], "shakespeare_char"),
    Case("prepare_val_fraction_too_big", lambda e: ["prepare", "shakespeare_char",
                                                    "--val_fraction=1.5"], "val_fraction"),
    Case("prepare_val_fraction_zero", lambda e: ["prepare", "shakespeare_char",
                                                 "--val_fraction=0"], "val_fraction"),
    Case("prepare_unwritable_data_dir",
         lambda e: ["prepare", str(write(e.tmp / "t.txt", "hi " * 99)),
                    f"--data_dir={write(e.tmp / 'file', 'x')}/d"], "data"),
    Case("prepare_bad_jsonl_line", lambda e: ["prepare", str(write(e.tmp / "x.jsonl",
                                                                   '{"text": "ok"}\n{oops\n')),
                                              f"--data_dir={e.tmp / 'd'}"], "line 2"),
    # ---- train: settings
    Case("train_batch_size_zero", lambda e: train(e, "--batch_size=0"), "batch_size"),
    Case("train_negative_learning_rate", lambda e: train(e, "--learning_rate=-1"),
         "learning_rate"),
    Case("train_heads_do_not_divide_width", lambda e: train(e, "--n_embd=100", "--n_head=3"),
         "n_head"),
    Case("train_cuda_without_cuda", lambda e: train(e, "--device=cuda"), "available"),
    Case("train_unknown_dtype", lambda e: train(e, "--dtype=float64"), "dtype"),
    Case("train_float16_on_cpu", lambda e: train(e, "--dtype=float16"), "float16"),
    Case("train_non_numeric_override", lambda e: train(e, "--n_layer=abc"), "n_layer"),
    Case("train_unknown_key", lambda e: train(e, "--n_layers=3"), "n_layer"),
    Case("train_bad_boolean", lambda e: train(e, "--bias=maybe"), "bias"),
    Case("train_dropout_out_of_range", lambda e: train(e, "--dropout=1.5"), "dropout"),
    Case("train_negative_max_iters", lambda e: train(e, "--max_iters=-5"), "max_iters"),
    Case("train_missing_config_file", lambda e: ["train", str(e.tmp / "missing.py")],
         "not found"),
    Case("train_unknown_preset", lambda e: ["train", "shakespeare_chr"], "presets"),
    Case("train_config_with_function_call",
         lambda e: ["train", str(write(e.tmp / "evil.py", "n_layer = 2\nimport os\n"
                                       "os.system('touch pwned')\n"))], "line 2"),
    Case("train_config_bad_toml", lambda e: ["train", str(write(e.tmp / "c.toml", "n_layer = \n"))],
         "TOML"),
    Case("train_config_unknown_key", lambda e: ["train", str(write(e.tmp / "c.toml",
                                                                   "n_embed = 64\n"))], "n_embd"),
    # ---- train: data
    Case("train_dataset_not_prepared", lambda e: train(e, "--dataset=mystery"), "prepare"),
    Case("train_block_size_larger_than_val_split",
         lambda e: ["train", *tiny_args(e.data, e.tmp / "out", max_iters=2),
                    "--dataset=small", "--block_size=512"], "block_size"),
    Case("train_truncated_bin", lambda e: corrupt(shakespeare(e) / "train.bin") or train(e),
         "truncated"),
    Case("train_garbled_meta_json", lambda e: write(shakespeare(e) / "meta.json", "{not json")
         and train(e), "meta.json"),
    # ---- train: resume
    Case("train_resume_without_checkpoint", lambda e: train(e, "--init_from=resume"),
         "resume"),
    Case("train_resume_other_shape", lambda e: ["train", *tiny_args(e.data, e.run),
                                                "--init_from=resume", "--n_layer=3"], "n_layer"),
    Case("train_resume_corrupt_checkpoint",
         lambda e: corrupt(e.run / "resume.safetensors") or
         ["train", *tiny_args(e.data, e.run), "--init_from=resume"], "corrupt"),
    Case("train_resume_other_dataset", lambda e: ["train", *tiny_args(e.data, e.run),
                                                  "--dataset=small", "--init_from=resume"],
         "vocabulary"),
    Case("train_unwritable_out_dir",
         lambda e: train(e, out=f"{write(e.tmp / 'blocker', 'x').name}/run"), "out_dir"),
    # ---- sample
    Case("sample_missing_run_dir", lambda e: ["sample", f"--out_dir={e.tmp / 'nope'}"],
         "does not exist"),
    Case("sample_run_dir_without_weights",
         lambda e: [p.unlink() for p in e.run.glob("*.safetensors")] and sample(e), "weights"),
    Case("sample_corrupt_weights", lambda e: corrupt(e.run / "model.safetensors") or sample(e),
         "corrupt"),
    Case("sample_garbled_run_json", lambda e: write(e.run / "run.json", "{") and sample(e),
         "run.json"),
    Case("sample_missing_tokenizer_metadata",
         lambda e: write(e.run / "run.json", json.dumps(
             {k: v for k, v in json.loads((e.run / "run.json").read_text()).items()
              if k != "tokenizer"})) and sample(e), "tokenizer"),
    Case("sample_unknown_characters_in_prompt", lambda e: sample(e, "--start=Hello ☃ ✓"),
         "☃"),
    Case("sample_top_k_zero", lambda e: sample(e, "--top_k=0"), "top_k"),
    Case("sample_top_p_above_one", lambda e: sample(e, "--top_p=1.5"), "top_p"),
    Case("sample_negative_temperature", lambda e: sample(e, "--temperature=-1"), "temperature"),
    Case("sample_prompt_file_missing", lambda e: sample(e, f"--start=FILE:{e.tmp / 'p.txt'}"),
         "p.txt"),
    Case("sample_cuda_without_cuda", lambda e: sample(e, "--device=cuda"), "available"),
    # ---- plot and the command itself
    Case("plot_run_dir_without_metrics", lambda e: (e.run / "metrics.jsonl").unlink() or
         ["plot", str(e.run)], "metrics"),
    Case("plot_empty_log", lambda e: ["plot", str(write(e.tmp / "train.log", ""))], "iter"),
    Case("plot_unparseable_log", lambda e: ["plot", str(write(e.tmp / "x.log", "hello\n"))],
         "iter"),
    Case("plot_unwritable_output", lambda e: ["plot", str(e.run), "-o",
                                              f"{write(e.tmp / 'f', 'x')}/loss.png"], "loss.png"),
    Case("plot_without_inputs", lambda e: ["plot", "--logy"], "RUN_DIR|LOGFILE|-"),
    Case("plot_unknown_short_option", lambda e: ["plot", str(e.run), "-x", "tokens"], "-x"),
    # ---- export, import-nanogpt, bench
    Case("export_without_out_dir", lambda e: ["export", str(e.run), "--format", "hf"],
         "OUT_DIR"),
    Case("export_unknown_format", lambda e: ["export", str(e.run), "--format=onnx",
                                             str(e.tmp / "o")], "format"),
    Case("import_nanogpt_of_a_folio_run", lambda e: ["import-nanogpt", str(e.run),
                                                     str(e.tmp / "r")], "ckpt.pt"),
    Case("import_nanogpt_extra_argument", lambda e: ["import-nanogpt", "a", "b", "c"],
         "unexpected argument 'c'"),
    Case("bench_unknown_case", lambda e: ["bench", "--cases=gpu"], "cpu_char"),
    Case("unknown_command", lambda e: ["trian"], "train"),
]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with file contents, to prove nothing was written or changed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def env(tmp_path, char_data_dir, tiny_run, shakespeare_cache) -> Env:
    data = tmp_path / "data"
    shutil.copytree(char_data_dir, data)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    from folio.config import PrepareConfig
    from folio.data.prepare import prepare
    # a dataset too small for large blocks, with another vocabulary
    text = write(tmp_path / "small.txt", "abcdefgh xyz\n" * 40)
    prepare(PrepareConfig(dataset=str(text), name="small", data_dir=str(data)))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return Env(tmp=scratch, data=data, run=run)


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


def assert_one_line_error(code: int, stderr: str, expect: str) -> None:
    """A non-zero exit code and exactly one `folio: error:` line naming `expect`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("folio: error:"), stderr
    assert expect.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_gives_one_line_error(case: Case, env: Env, tmp_path, capsys, monkeypatch):
    argv = case.argv(env)
    before = snapshot(tmp_path)
    monkeypatch.chdir(env.tmp)
    capsys.readouterr()
    code = main(argv)
    assert_one_line_error(code, capsys.readouterr().err, case.expect)
    assert snapshot(tmp_path) == before, "the failed command left files behind or changed some"


def folio_command() -> list[str]:
    """The installed `folio` console script beside this Python, else `python -m folio`."""
    script = Path(sys.executable).with_name("folio")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "folio"]


def test_the_folio_command_exits_with_one_line_and_no_traceback(env: Env, tmp_path):
    """The smoke test of the real process: exit code, stderr, no teardown noise, no debris."""
    before = snapshot(tmp_path)
    proc = subprocess.run([*folio_command(), *train(env, "--dataset=mystery")],
                          capture_output=True, text=True, cwd=env.tmp, timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert_one_line_error(proc.returncode, proc.stderr, "prepare")
    assert snapshot(tmp_path) == before
