"""Before/after: one benchmark run on two versions of folio, taking turns, in one run.

Checks out REF (default: the parent of HEAD) into a temporary git worktree, then runs the
benchmark command under each tree in turn (`--rounds` times each, alternating, so a drift in
the machine's speed hits both alike), each with its own copy of the benchmark script and its
own `src/` first on PYTHONPATH. Prints every JSON line the benchmark printed, tagged with
"tree" ("before" or "after") and "round", then one summary line per case with the median of
each numeric figure over the rounds and the after / before ratio.

    python benchmarks/before_after.py --ref 0364501 -- benchmarks/sample_speed.py --tokens 500
    python benchmarks/before_after.py --ref main~3 -- -m folio bench --cases cpu_char
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(tree: Path, command: list[str]) -> list[dict]:
    """The JSON lines `command` prints when run from `tree` with tree/src on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run([sys.executable, *command], cwd=tree, env=env, text=True,
                         stdout=subprocess.PIPE, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def case_of(line: dict) -> str:
    return str(line.get("case") or line.get("model") or line.get("name") or "?")


def numbers(line: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a JSON line, keyed by its dotted path."""
    found: dict[str, float] = {}
    for key, value in line.items():
        if isinstance(value, dict):
            found.update(numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[prefix + key] = float(value)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="HEAD~1", help="the 'before' version (a git ref)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: the benchmark's arguments to python")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    results: dict[str, dict[str, list[dict]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory(prefix="folio-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before),
                        args.ref], check=True, stdout=subprocess.DEVNULL)
        try:
            for r in range(args.rounds):
                for tree_name, tree in (("before", before), ("after", REPO)):
                    for line in run(tree, command):
                        print(json.dumps({"tree": tree_name, "round": r, **line}), flush=True)
                        results[tree_name].setdefault(case_of(line), []).append(line)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(before)], check=False)
    for case, after_lines in results["after"].items():
        before_lines = results["before"].get(case, [])
        summary: dict = {"summary": case, "ref": args.ref, "rounds": args.rounds}
        for key in numbers(after_lines[0]):
            a = [numbers(x).get(key) for x in after_lines]
            b = [numbers(x).get(key) for x in before_lines]
            a, b = [v for v in a if v is not None], [v for v in b if v is not None]
            if a and b and statistics.median(b):
                summary[key] = {"before": statistics.median(b), "after": statistics.median(a),
                                "after_over_before": round(statistics.median(a)
                                                           / statistics.median(b), 3)}
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
