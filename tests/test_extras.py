"""Optional packages: a missing one is one line naming its `pip install 'folio[EXTRA]'`, and
the extras the code names are the ones pyproject.toml and requirements-test.txt install."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

from folio.cli import main
from folio.errors import MissingPackageError
from folio.extras import need

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def missing(monkeypatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when not installed


def test_need_returns_the_module_when_it_is_installed():
    assert need("json", "serve", "anything") is json


def test_a_missing_package_names_the_extra_that_installs_it(monkeypatch):
    missing(monkeypatch, "fastapi")
    with pytest.raises(MissingPackageError) as e:
        need("fastapi", "serve", "folio serve")
    assert str(e.value) == "folio serve needs fastapi: pip install 'folio[serve]'"


def test_a_missing_submodule_names_the_package_to_install(monkeypatch):
    missing(monkeypatch, "torch.utils.tensorboard")
    with pytest.raises(MissingPackageError, match=r"^tensorboard=True needs tensorboard: "):
        need("torch.utils.tensorboard", "tensorboard", "tensorboard=True", "tensorboard")


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_folio_serve_without_its_extra_is_one_line(monkeypatch, capsys, tmp_path, module):
    missing(monkeypatch, module)
    assert main(["serve", f"--runs_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == (f"folio: error: folio serve needs {module}: "
                                       "pip install 'folio[serve]'\n")


def test_export_without_transformers_is_one_line(monkeypatch, capsys, tiny_run, tmp_path):
    missing(monkeypatch, "transformers")
    assert main(["export", str(tiny_run), "--format", "hf", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == ("folio: error: Hugging Face support needs "
                                       "transformers: pip install 'folio[hf]'\n")


def test_reading_files_without_the_datasets_extra_names_it(monkeypatch, tmp_path):
    from folio.data import hub, sources
    from folio.data.tokenizer import make_tokenizer

    missing(monkeypatch, "pyarrow", "pyarrow.parquet", "zstandard", "datasets", "tokenizers")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer.json.zst").write_bytes(b"")
    cases = [(lambda: next(sources.read_parquet(tmp_path / "a.parquet", "text")), "datasets"),
             (lambda: sources.open_binary(tmp_path / "tokenizer.json.zst").__enter__(),
              "datasets"),
             (hub._import_datasets, "datasets"),
             (lambda: make_tokenizer(f"hf:{tmp_path}"), "hf")]
    for call, extra in cases:
        with pytest.raises(MissingPackageError, match=rf"pip install 'folio\[{extra}\]'$"):
            call()


# ---------------------------------------------------------------------------- the install

def requirement_names(lines: list[str]) -> set[str]:
    """Distribution names of requirement lines (comments, `-r` and markers left out)."""
    names = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower())
    return names


def pinned(file: str) -> set[str]:
    lines = (ROOT / file).read_text("utf-8").splitlines()
    for line in lines:
        assert line.startswith(("#", "-r ")) or "==" in line or not line.strip(), \
            f"{file}: {line!r} is not pinned"
    return requirement_names(lines)


def extras() -> dict[str, set[str]]:
    """pyproject.toml's extras, `folio[a,b]` expanded; key "" is the core."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    declared = {"": project["dependencies"], **project["optional-dependencies"]}

    def expand(name: str) -> set[str]:
        found = set()
        for req in declared[name]:
            inner = re.fullmatch(r"folio\[(.*)\]", req)
            found |= (set().union(*(expand(e.strip()) for e in inner[1].split(",")))
                      if inner else requirement_names([req]))
        return found
    return {name: expand(name) for name in declared}


def test_requirements_pin_the_core_and_the_test_extra_of_pyproject():
    declared = extras()
    core = pinned("requirements.txt")
    assert core == declared[""]
    assert "-r requirements.txt" in (ROOT / "requirements-test.txt").read_text("utf-8")
    assert pinned("requirements-test.txt") == declared["test"]
    assert declared["dev"] == declared["test"]
    # every feature extra is in the test set, and none of them in the core
    features = set(declared) - {"", "test", "dev"}
    assert set().union(*(declared[e] for e in features)) <= declared["test"] - core


def test_every_extra_the_code_names_installs_the_package_it_names():
    declared = extras()
    calls = [node for path in (ROOT / "src" / "folio").rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text("utf-8")))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "need"]
    assert len(calls) >= 9  # every site: fastapi, uvicorn, transformers, tokenizers, ...
    for call in calls:
        module, extra = (ast.literal_eval(a) for a in call.args[:2])  # literals, to be checked
        package = ast.literal_eval(call.args[3]) if len(call.args) > 3 else module.split(".")[0]
        assert package in declared.get(extra, set()), f"folio[{extra}] does not install {package}"
