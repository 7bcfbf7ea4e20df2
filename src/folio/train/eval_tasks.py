"""`folio eval RUN --tasks=...`: lm-evaluation-harness tasks (hellaswag, arc_easy, ... or a
task defined in a local directory) on a run, through folio's Hugging Face export.

The run is exported (`store/export.py`, the same files `folio export --format hf` writes) into
a temporary directory, which lm-eval's `HFLM` loads as it loads any transformers model; its
results (each metric with its standard error, the number of examples, the few-shot count and
limit, lm-eval's version) are printed as a table and appended to the run's evals.jsonl.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from folio.config import EvalConfig
from folio.errors import DataError
from folio.extras import need
from folio.machine.device import resolve_device
from folio.store import rundir
from folio.store.export import export_hf

PURPOSE = "folio eval --tasks"
FIND_NAMES = ("`lm-eval ls tasks` lists the names (hellaswag, arc_easy, ...); a local task is "
              "a directory or YAML file path")


def lm_eval() -> Any:
    """The lm_eval package, or the one-line error naming folio's `eval` extra."""
    return need("lm_eval", "eval", PURPOSE, "lm-eval")


def resolve_tasks(spec: str) -> tuple[Any, list[str]]:
    """(lm-eval TaskManager, task names) for --tasks: registered names, and task directories
    or YAML files (their tasks, found through the manager's include_path). An unknown name or
    a path that defines no task is a one-line DataError."""
    lm_eval()
    TaskManager = need("lm_eval.tasks", "eval", PURPOSE, "lm-eval").TaskManager
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise DataError(f"--tasks={spec!r} names no task; {FIND_NAMES}")
    names: list[str] = []
    include: list[str] = []
    registered = False
    for item in items:
        path = Path(item)
        if path.exists():
            root = path if path.is_dir() else path.parent
            include.append(str(root))
            names += local_tasks(TaskManager(include_path=str(root), include_defaults=False),
                                 path)
        elif item.endswith((".yaml", ".yml")) or "/" in item:
            raise DataError(f"--tasks: {item} does not exist; {FIND_NAMES}")
        else:
            names.append(item)
            registered = True
    manager = TaskManager(include_path=include or None, include_defaults=registered)
    for name in names:
        if name not in manager.all_tasks:
            raise DataError(f"unknown lm-eval task {name!r}; {FIND_NAMES}")
    return manager, list(dict.fromkeys(names))


def local_tasks(manager: Any, path: Path) -> list[str]:
    """The tasks a directory defines (its groups, if it has any, else its tasks), or the task
    of one YAML file."""
    entries = manager.task_index
    if path.is_file():
        found = [name for name, e in entries.items()
                 if e.yaml_path is not None and Path(e.yaml_path).resolve() == path.resolve()]
    else:
        groups = [name for name in manager.all_groups if name in entries]
        found = groups or list(manager.all_subtasks)
    if not found:
        raise DataError(f"--tasks: {path} defines no lm-eval task (a YAML file with a `task:` "
                        "key)")
    return found


def run_tasks(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Run cfg.tasks on cfg.run_dir's model, print the table and append one row per task to
    the run's evals.jsonl; the rows."""
    lm = lm_eval()
    manager, names = resolve_tasks(cfg.tasks)  # a bad name stops before the export
    HFLM = need("lm_eval.models.huggingface", "eval", PURPOSE, "lm-eval").HFLM
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="folio-lm-eval-") as tmp:
        model_dir = export_hf(cfg.run_dir, Path(tmp) / "hf")
        tokenizer = need("transformers", "hf", "Hugging Face support").AutoTokenizer \
            .from_pretrained(model_dir, local_files_only=True)
        model = HFLM(pretrained=str(model_dir), tokenizer=tokenizer, device=str(device),
                     batch_size=cfg.batch_size, dtype=cfg.dtype,
                     prefix_token_id=prefix_token(tokenizer))
        truncated = TruncationCount()
        hf_log = logging.getLogger("lm_eval.models.huggingface")
        hf_log.addFilter(truncated)
        try:
            results = lm.simple_evaluate(
                model=model, tasks=names, task_manager=manager,
                num_fewshot=cfg.num_fewshot if cfg.num_fewshot >= 0 else None,
                limit=cfg.limit or None, log_samples=False)
        except ConnectionError as e:  # a hub task's dataset, offline
            raise DataError(f"--tasks: a task's dataset could not be downloaded ({e}); hub "
                            "tasks need the internet once (then HF_DATASETS_OFFLINE=1 reads "
                            "the cache)") from None
        finally:
            hf_log.removeFilter(truncated)
    if truncated.count:
        print(f"note: {truncated.count:,} request(s) were longer than the model's context "
              f"({model.max_length:,} tokens); lm-eval kept their last tokens", flush=True)
    run = Path(cfg.run_dir)
    iteration = (rundir.read_run_info(run).iter_num if (run / rundir.RUN_INFO).is_file()
                 else None)
    rows = task_rows(results, lm.__version__, cfg.limit, iteration)
    print(format_table(rows, cfg.run_dir), flush=True)
    if iteration is not None:
        for row in rows:
            rundir.append_eval(run, row)
    return rows


class TruncationCount(logging.Filter):
    """Counts lm-eval's one warning per request cut to the model's context, and drops it (a
    char model on hellaswag would print one per request); folio prints the count once."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "exceeds model's maximum length" in record.getMessage():
            self.count += 1
            return False
        return True


def prefix_token(tokenizer: Any) -> int:
    """The token lm-eval puts before an empty context: the start or end of text, or for a
    vocabulary without either (a char model's) the newline that separates its documents (else
    the first token)."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    return newline[0] if len(newline) == 1 else 0


def task_rows(results: dict[str, Any], version: str, limit: int, iteration: int | None
              ) -> list[dict[str, Any]]:
    """One evals.jsonl row per task (and group) of lm-eval's results: its metrics, each with
    its standard error beside it as `<metric>_stderr` (None where lm-eval has none; lm-eval's
    "acc,none" is "acc", another filter's "acc/filter"), the examples scored and the few-shot
    count."""
    rows = []
    for task, values in {**results["results"], **results.get("groups", {})}.items():
        found: dict[str, float | None] = {}
        for key, value in values.items():
            metric, comma, filt = key.partition(",")
            if comma:  # not "alias" or "sample_len"
                found[metric if filt == "none" else f"{metric}/{filt}"] = _number(value)
        metrics: dict[str, float | None] = {}
        for name, value in found.items():
            if not name.partition("/")[0].endswith("_stderr") and value is not None:
                metric, slash, filt = name.partition("/")
                metrics[name] = value
                metrics[f"{name}_stderr"] = found.get(f"{metric}_stderr{slash}{filt}")
        counts = results.get("n-samples", {}).get(task, {})
        rows.append({"kind": "task", "task": task, "metrics": metrics,
                     "samples": counts.get("effective"), "docs": counts.get("original"),
                     "num_fewshot": results.get("n-shot", {}).get(task), "limit": limit or None,
                     "task_version": results.get("versions", {}).get(task),
                     "lm_eval": version, "iter": iteration})
    return rows


def _number(value: Any) -> float | None:
    """A finite float, or None (lm-eval writes "N/A" for a standard error it has not)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_table(rows: list[dict[str, Any]], run: str) -> str:
    """The rows as a short table, one line per metric:

    lm-eval 0.4.13 on out (iter 40)
    task                     metric      value  ± stderr  n-shot  samples
    folio_shakespeare_lines  acc        0.9583    0.0417       0       24
    """
    head = (f"lm-eval {rows[0]['lm_eval'] if rows else '?'} on {run}"
            + (f" (iter {rows[0]['iter']})" if rows and rows[0]["iter"] is not None else ""))
    shown = {id(r): [m for m in r["metrics"] if f"{m}_stderr" in r["metrics"]] for r in rows}
    tw = max([len("task"), *(len(r["task"]) for r in rows)])
    mw = max([len("metric"), *(len(m) for names in shown.values() for m in names)])
    lines = [head, f"{'task':<{tw}}  {'metric':<{mw}} {'value':>10} {'± stderr':>10} "
                   f"{'n-shot':>7} {'samples':>8}"]
    for row in rows:
        for i, metric in enumerate(shown[id(row)]):
            first = i == 0
            err = row["metrics"][f"{metric}_stderr"]
            lines.append(f"{row['task'] if first else '':<{tw}}  {metric:<{mw}} "
                         f"{_fixed(row['metrics'][metric]):>10} "
                         f"{'' if err is None else _fixed(err):>10} "
                         f"{_blank(row['num_fewshot'] if first else None):>7} "
                         f"{_blank(row['samples'] if first else None):>8}")
    return "\n".join(line.rstrip() for line in lines)


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


def _fixed(value: float) -> str:
    """4 decimals, or 4 significant digits for a large value (a perplexity)."""
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
