"""`folio eval RUN --tasks=...`: lm-evaluation-harness on a run through its Hugging Face
export, with a task read from tests/data (the hub is unreachable here). lm-eval's accuracy must
equal the one computed from folio's own log-likelihoods of the same choices, and a trained
char model must prefer the real endings of Shakespeare lines; bad input is one line."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHAKESPEARE_TEXT, tiny_args
from test_export import make_run

from folio.cli import main
from folio.model.gpt import GPT, GPTConfig
from folio.store import rundir
from folio.store.rundir import read_evals
from folio.store.sources import load_model

TASK_DIR = REPO / "tests" / "data" / "lm_eval_tasks" / "shakespeare_lines"
LINES = "folio_shakespeare_lines"  # multiple choice
ENDINGS = "folio_shakespeare_endings"  # loglikelihood
DOCS = [json.loads(line) for line in (TASK_DIR / "lines.jsonl").read_text().splitlines()]
CHARS = sorted(set(SHAKESPEARE_TEXT.read_text("utf-8")))


def loglikelihood(model: GPT, tokenizer, context: str, continuation: str
                  ) -> tuple[float, bool]:
    """(log-likelihood of `continuation` after `context`, whether each of its tokens is the
    argmax) from folio's model and tokenizer, as lm-eval's HFLM scores a request: the pair's
    tokens split where the context's end, the window's last block_size + 1 tokens."""
    T = model.config.block_size
    ctx = tokenizer.encode(context)
    cont = tokenizer.encode(context + continuation)[len(ctx):]
    seq = torch.tensor((ctx + cont)[-(T + 1):])
    with torch.no_grad():
        logp = model.logits(model.hidden(seq[None, :-1]))[0].float().log_softmax(-1)
    n = len(cont)
    ll = logp[-n:].gather(1, seq[-n:, None]).sum().item()
    return ll, bool((logp[-n:].argmax(-1) == seq[-n:]).all())


def expected_scores(run: Path, docs: list[dict]) -> dict[str, dict[str, float]]:
    """What both local tasks should measure, computed with folio alone: the accuracy of the
    multiple-choice task (the choice of highest log-likelihood, and per character), and the
    perplexity and greedy accuracy of the real endings."""
    model, tokenizer, _ = load_model(run)
    hits, hits_norm, real, greedy = [], [], [], []
    for doc in docs:
        scored = [loglikelihood(model, tokenizer, doc["context"], " " + c)
                  for c in doc["choices"]]
        lls = np.array([ll for ll, _ in scored])
        hits.append(np.argmax(lls) == doc["gold"])
        hits_norm.append(np.argmax(lls / [len(c) for c in doc["choices"]]) == doc["gold"])
        real.append(lls[doc["gold"]])
        greedy.append(scored[doc["gold"]][1])
    return {LINES: {"acc": np.mean(hits), "acc_norm": np.mean(hits_norm)},
            ENDINGS: {"perplexity": math.exp(-np.mean(real)), "acc": np.mean(greedy)}}


def by_task(run: Path) -> dict[str, dict]:
    return {row["task"]: row for row in read_evals(run)}


def scores(row: dict) -> dict[str, float]:
    """A task row's metrics without their standard errors."""
    return {k: v for k, v in row["metrics"].items() if not k.endswith("_stderr")}


def random_run(run_dir: Path, **changes) -> Path:
    """A char run with random weights spread wide enough that the choices' scores differ (seed
    2: right on 1 of the 24 documents, a score a scoring that differs is unlikely to hit)."""
    config = GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=32,
                       **changes)
    make_run(run_dir, config, {"kind": "char", "chars": CHARS}, seed=2, iter_num=7)
    return run_dir


@pytest.mark.slow
def test_lm_eval_scores_are_the_ones_folio_computes_from_its_own_log_likelihoods(
        tmp_path, capsys):
    run = random_run(tmp_path / "random")
    assert main(["eval", str(run), f"--tasks={TASK_DIR}", "--device=cpu", "--batch_size=5"]
                ) == 0
    out = capsys.readouterr().out
    rows, expected = by_task(run), expected_scores(run, DOCS)
    assert expected[LINES]["acc"] == 1 / 24  # the random model: right once (chance: 8 times)
    for task in (LINES, ENDINGS):
        assert scores(rows[task]) == pytest.approx(expected[task], rel=1e-5)
    acc = expected[LINES]["acc"]
    stderr = (acc * (1 - acc) / (len(DOCS) - 1)) ** 0.5  # lm-eval's standard error of a mean
    assert rows[LINES]["metrics"]["acc_stderr"] == pytest.approx(stderr)
    assert set(rows[ENDINGS]["metrics"]) == {"perplexity", "perplexity_stderr", "acc",
                                             "acc_stderr"}
    row = rows[LINES]
    assert (row["kind"], row["samples"], row["docs"], row["limit"], row["num_fewshot"],
            row["iter"]) == ("task", 24, 24, None, 0, 7)
    assert row["lm_eval"] == __import__("lm_eval").__version__
    assert f"lm-eval {row['lm_eval']} on {run} (iter 7)\n" in out
    assert re.search(rf"^{LINES} +acc +{acc:.4f} +{stderr:.4f} +0 +24$", out, re.M), out
    # each request longer than block_size + 1 tokens is counted once (the loglikelihood task's
    # requests are the multiple-choice task's right answers: lm-eval scores them once)
    tokenizer = load_model(run)[1]
    longer = sum(len(tokenizer.encode(f"{d['context']} {c}")) > 33
                 for d in DOCS for c in d["choices"])
    assert longer > 0
    assert (f"note: {longer:,} request(s) were longer than the model's context (32 tokens)"
            in out)


@pytest.mark.slow
def test_limit_and_num_fewshot_reach_the_harness(tmp_path, capsys):
    run = random_run(tmp_path / "random")
    assert main(["eval", str(run), f"--tasks={TASK_DIR}", "--device=cpu", "--limit=5",
                 "--num_fewshot=2"]) == 0
    row = by_task(run)[LINES]
    assert (row["samples"], row["docs"], row["limit"], row["num_fewshot"]) == (5, 24, 5, 2)


def char_run(char_data_dir: Path, out: Path, **settings) -> Path:
    assert main(["train", *tiny_args(char_data_dir, out, max_iters=60, eval_interval=60,
                                     lr_decay_iters=60, **settings)]) == 0
    return out


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> Path:
    """A data dir with 60,000 characters of tiny Shakespeare in GPT-2 tokens."""
    root = tmp_path_factory.mktemp("bpe")
    (root / "slice.txt").write_text(SHAKESPEARE_TEXT.read_text("utf-8")[:60_000])
    assert main(["prepare", str(root / "slice.txt"), "--name=bpe", "--tokenizer=gpt2",
                 f"--data_dir={root / 'data'}"]) == 0
    return root / "data"


@pytest.mark.slow
@pytest.mark.parametrize("recipe, tokens", [("nanogpt", "char"), ("modern", "char"),
                                            ("nanogpt", "gpt2"), ("modern", "gpt2")])
def test_trained_runs_through_the_harness_score_what_folio_scores(
        recipe, tokens, char_data_dir, tmp_path, capsys, request):
    if tokens == "char":
        run = char_run(char_data_dir, tmp_path / "run", recipe=recipe)
        task = TASK_DIR
    else:  # a GPT-2 BPE run; the tasks named by their YAML files
        data = request.getfixturevalue("bpe_data")
        run = char_run(data, tmp_path / "run", recipe=recipe, dataset="bpe")
        task = f"{TASK_DIR / 'shakespeare_lines.yaml'},{TASK_DIR / 'shakespeare_endings.yaml'}"
    capsys.readouterr()
    assert main(["eval", str(run), f"--tasks={task}", "--device=cpu", "--num_fewshot=0"]) == 0
    out = capsys.readouterr().out
    print(out)
    rows, expected = by_task(run), expected_scores(run, DOCS)
    assert set(rows) == {LINES, ENDINGS}
    for task, row in rows.items():
        assert scores(row) == pytest.approx(expected[task], rel=1e-5)
        assert row["samples"] == len(DOCS) and row["limit"] is None and row["iter"] == 60
    if tokens == "char":  # chance is 1/3; an untrained char model scores about that
        assert rows[LINES]["metrics"]["acc"] >= 0.75, out


def test_eval_help_names_the_hub_tasks(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--tasks" in out and "hellaswag" in out and "lm-eval ls tasks" in out


@pytest.mark.parametrize("case, message", [
    pytest.param("unknown", "unknown lm-eval task 'no_such_task'; `lm-eval ls tasks` lists the "
                 "names", marks=pytest.mark.slow),  # reads lm-eval's thousands of task files
    ("missing_path", "--tasks: nowhere/my_task does not exist"),
    ("no_task", "defines no lm-eval task"),
    ("no_lm_eval", "folio eval --tasks needs lm-eval: pip install 'folio[eval]'"),
    ("softcap", "logit_softcap=15"),
    ("no_weights", "model.safetensors"),
])
def test_bad_task_input_is_one_line(case, message, tmp_path, capsys, monkeypatch):
    run = random_run(tmp_path / "run", **({"logit_softcap": 15.0, "rope": True,
                                           "norm": "rmsnorm"} if case == "softcap" else {}))
    tasks = {"unknown": "no_such_task", "missing_path": "nowhere/my_task",
             "no_task": str(tmp_path)}.get(case, str(TASK_DIR))
    if case == "no_lm_eval":
        monkeypatch.setitem(sys.modules, "lm_eval", None)
    if case == "no_weights":
        (run / rundir.MODEL_FILE).unlink()
    assert main(["eval", str(run), f"--tasks={tasks}", "--device=cpu"]) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert read_evals(run) == []


def test_lm_eval_results_become_rows_with_each_metric_beside_its_stderr():
    from folio.train.eval_tasks import format_table, task_rows

    results = {  # the shape of lm-eval 0.4's simple_evaluate results
        "results": {
            LINES: {"alias": LINES, "acc,none": 0.75, "acc_stderr,none": 0.0417,
                    "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A", "sample_len": 24},
            "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01,
                      "exact_match,flexible-extract": 0.2,
                      "exact_match_stderr,flexible-extract": 0.02}},
        "groups": {"mmlu": {"acc,none": 0.3, "acc_stderr,none": 0.001}},
        "n-samples": {LINES: {"original": 24, "effective": 20}},
        "n-shot": {LINES: 0, "gsm8k": 5}, "versions": {LINES: 1.0}}
    rows = task_rows(results, "0.4.13", 20, 60)
    assert rows[0] == {"kind": "task", "task": LINES, "samples": 20, "docs": 24,
                       "metrics": {"acc": 0.75, "acc_stderr": 0.0417, "acc_norm": 0.5,
                                   "acc_norm_stderr": None},
                       "num_fewshot": 0, "limit": 20, "task_version": 1.0, "lm_eval": "0.4.13",
                       "iter": 60}
    assert rows[1]["metrics"] == {"exact_match/strict-match": 0.1,
                                  "exact_match/strict-match_stderr": 0.01,
                                  "exact_match/flexible-extract": 0.2,
                                  "exact_match/flexible-extract_stderr": 0.02}
    assert (rows[2]["task"], rows[2]["metrics"], rows[2]["samples"]) == (
        "mmlu", {"acc": 0.3, "acc_stderr": 0.001}, None)
    table = format_table(rows, "out").splitlines()
    assert table[0] == "lm-eval 0.4.13 on out (iter 60)"
    assert table[2].split() == [LINES, "acc", "0.7500", "0.0417", "0", "20"]
    assert table[3].split() == ["acc_norm", "0.5000"]
    assert table[4].split() == ["gsm8k", "exact_match/strict-match", "0.1000", "0.0100", "5"]
    assert len(table) == 7
