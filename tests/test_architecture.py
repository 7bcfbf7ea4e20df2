"""The package's shape: layers that import only downwards, and no import cycles at all.

Every `import` counts, also those inside functions: a lazy import keeps startup fast, it
does not make a cycle acceptable. The rules are the ones docs/architecture.md states.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "folio"

# A module may import its own subpackage and any layer below its own, never one above or
# beside it; the base modules (layer 0) may use each other.
LAYERS = {
    "errors": 0, "fsutil": 0, "config": 0, "extras": 0,
    "machine": 1, "data": 1,
    "model": 2,
    "speed": 3,
    "store": 4,
    "watch": 5,
    "train": 6, "infer": 6,
    "cli": 7, "__main__": 8,
}
# What reads a run dir to plot it imports no torch (`folio plot`, the loss.png refresher).
TORCH_FREE = ["folio.store.rundir", "folio.watch"]
SUBPACKAGES = ["data", "model", "speed", "train", "store", "infer", "watch", "machine"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """folio modules imported anywhere in the file (`from a import b` counts a.b if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != "folio":
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None  # the package root is exempt


def test_every_module_belongs_to_a_layer():
    assert [m for m in modules() if m != "folio" and layer(m) is None] == []


def test_layers_import_only_downwards():
    wrong = [f"{a} imports {b}" for a, deps in graph().items() for b in deps
             if layer(a) is not None and layer(b) is not None
             and a.split(".")[1] != b.split(".")[1] and layer(b) >= layer(a) > 0]
    assert wrong == []


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules, or [] (iterative DFS, three colours)."""
    state: dict[str, int] = {}
    for root in edges:
        if state.get(root):
            continue
        stack, path = [(root, iter(sorted(edges[root])))], [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(edges.get(child, ())))))
                path.append(child)
    return []


def test_there_are_no_import_cycles():
    assert find_cycle(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


@pytest.mark.slow
@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_each_subpackage_imports_without_the_cli(subpackage):
    code = ("import importlib, pkgutil, sys\n"
            f"import folio.{subpackage} as pkg\n"
            "for m in pkgutil.iter_modules(pkg.__path__):\n"
            "    importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
            "print(sorted(m for m in sys.modules if m.startswith('folio.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reading_a_run_dir_and_plotting_it_import_no_torch():
    code = ("import importlib, pkgutil, sys\n"
            f"for name in {TORCH_FREE!r}:\n"
            "    mod = importlib.import_module(name)\n"
            "    for m in pkgutil.iter_modules(getattr(mod, '__path__', [])):\n"
            "        importlib.import_module(f'{name}.{m.name}')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
