"""`folio report`: the report card of one run or several compared (HTML + markdown), written
by training when it ends, linked from `folio serve`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import tiny_args

from folio.cli import main as folio_main
from folio.store.rundir import (
    REPORT_FILE,
    REPORT_MD_FILE,
    SAMPLES_FILE,
    RunInfo,
    append_eval,
    read_evals,
    read_run_info,
    write_run_info,
)
from folio.train.budget import Budget, card_sample_seconds, card_seconds
from folio.watch.metrics import MetricsLog
from folio.watch.report import (
    changed_settings,
    eval_table,
    load_cards,
    render_markdown,
    render_report,
    write_report,
)

MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 65,
         "dropout": 0.0, "bias": False}
HARDWARE = {"cpu": "Test CPU 9000 (25/1/1)", "cpu_flags": ["avx2", "fma"],
            "capability": "AVX2", "threads": 3, "gpu": None}


def fake_run(path: Path, lr: float = 1e-3, scale: float = 1.0, with_bpb: bool = True) -> Path:
    """A run dir with run.json and metrics.jsonl written by folio's own writers."""
    path.mkdir(parents=True)
    write_run_info(path, RunInfo(
        model=MODEL, n_params=12_345, dataset="shakespeare_char",
        tokenizer={"kind": "char", "chars": list("abc")},
        config={"learning_rate": lr, "max_iters": 40, "n_layer": 2, "batch_size": 12},
        iter_num=40, best_val_loss=2.0 * scale, best_val_bpb=2.9 * scale if with_bpb else None,
        best_iter=40, dtype="float32", compile=False, device="cpu",
        tuning={"choice": "float32 fused", "knobs": {"dtype": "float32", "fused_loss": True},
                "speedup": 1.234, "cached": False,
                "ms_per_step": {"float32 fused": 12.5, "float32": 15.43}},
        hardware=HARDWARE, tokens_per_iter=384, flops_per_token=1e5, peak_flops=1e11,
        wall_s=75.0, versions={"python": "3.12.1", "torch": "2.13.0", "folio": "0.9"}))
    with MetricsLog(path, console=False, plot_every_eval=False) as log:
        for it in range(0, 41, 5):
            if it:
                log.log_train(it, it * 384, it * 0.5, scale * (4.0 - it / 20), lr, 500.0,
                              768.0, 0.0123)
            if it % 20 == 0:
                bpb = (lambda v: v * 1.45) if with_bpb else (lambda v: None)
                val = scale * (4.1 - it / 20)
                log.log_eval(it, it * 384, it * 0.5, val - 0.1, val, bpb(val - 0.1), bpb(val))
    return path


def data_of(page: str, prefix: str) -> dict:
    m = re.search(rf'<script id="{prefix}folio-data" type="application/json">(.*?)</script>',
                  page, re.S)
    assert m, f"no {prefix} chart"
    return json.loads(m.group(1))


def test_one_run_page_has_hardware_settings_best_val_and_the_metrics_curves(tmp_path):
    run = fake_run(tmp_path / "a", lr=3e-3)
    page = render_report(load_cards([run]))
    assert "Test CPU 9000 (25/1/1) · avx2 fma · 3 threads · cpu" in page
    assert "python 3.12.1 · torch 2.13.0 · folio 0.9" in page
    assert ("float32 fused · dtype=float32, fused_loss=True · 1.23x eager float32 · "
            "ms/step: float32 fused 12.5, float32 15.4 · measured at start") in page
    # settings that differ from the defaults: the learning rate and max_iters, not n_layer 12?
    assert changed_settings(read_run_info(run)) == {"learning_rate": 3e-3, "max_iters": 40,
                                                   "n_layer": 2}
    assert re.search(r"<td>learning_rate</td><td>0.003</td><td>0.0006</td>", page)
    assert "batch_size" not in page.split("Settings that differ")[1].split("</section>")[0]
    assert "2.0000 at iter 40" in page and "2.9000 at iter 40" in page  # best val loss, bpb
    assert "15,360" in page  # tokens: 40 iterations x 384
    assert "1.54 GFLOP" in page  # 15,360 tokens x 1e5 FLOPs per token
    assert "768" in page and "1.23%" in page and "1m15s" in page  # tok/s, MFU, wall time
    loss, bpb = data_of(page, "loss-"), data_of(page, "bpb-")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [p[:2] for p in loss["runs"][0]["train"]] == [[r["iter"], r["loss"]] for r in train]
    assert [p[:2] for p in loss["runs"][0]["eval"]] == [[r["iter"], r["val_loss"]]
                                                        for r in evals]
    assert [p[1] for p in bpb["runs"][0]["eval"]] == [r["val_bpb"] for r in evals]
    assert 'folioChart("loss-");' in page and 'folioChart("bpb-");' in page
    assert not re.search(r"<script[^>]*\bsrc\s*=|<link\b|https://", page)  # self-contained


def test_two_runs_overlay_on_the_chosen_axis_with_a_settings_diff(tmp_path):
    a = fake_run(tmp_path / "a", lr=1e-3)
    b = fake_run(tmp_path / "b", lr=2e-3, scale=0.9, with_bpb=False)
    cards = load_cards([a, b])
    page = render_report(cards, x="flops")
    loss = data_of(page, "loss-")
    assert [r["name"] for r in loss["runs"]] == ["a", "b"]
    assert loss["xLabel"] == "training FLOPs (GFLOP)"
    assert loss["runs"][1]["train"][0][0] == pytest.approx(5 * 384 * 1e5 / 1e9)
    assert [r["name"] for r in data_of(page, "bpb-")["runs"]] == ["a"]  # b measured no bpb
    diff = page.split("Settings that differ between the runs")[1].split("</section>")[0]
    assert "<th>setting</th><th>a</th><th>b</th>" in diff
    assert "<td>learning_rate</td><td>0.001</td><td>0.002</td>" in diff
    assert "max_iters" not in diff  # the same in both
    md = render_markdown(cards)
    assert "| learning_rate | 0.001 | 0.002 |" in md and "## Validation during training: b" in md


def test_eval_results_of_any_kind_show_with_their_intervals(tmp_path):
    run = fake_run(tmp_path / "a")
    append_eval(run, {"data": "val", "tokens": 4096, "loss": 1.5, "loss_ci": 0.02,
                      "bpb": 2.1, "bpb_ci": 0.03, "iter": 40})
    append_eval(run, {"tasks": {"arc_easy": {"acc": 0.25, "acc_stderr": 0.01}}, "iter": 40})
    header, rows = eval_table(read_evals(run))
    assert header == ["data", "tokens", "loss", "bpb", "iter", "tasks.arc_easy.acc"]
    assert rows[0][2] == "1.5000 ± 0.0200" and rows[1][5] == "0.2500 ± 0.0100"
    page = render_report(load_cards([run]))
    assert "tasks.arc_easy.acc" in page and "1.5000 ± 0.0200" in page


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args in (["report", str(tmp_path / "nope")], ["report", str(tmp_path / "empty")],
                 ["report", str(fake_run(tmp_path / "a")), "--out", str(tmp_path / "r.txt")],
                 ["report", str(tmp_path / "a"), "--out", str(tmp_path / "no" / "r.html")]):
        assert folio_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("folio: error:") and err.count("\n") == 1, err
    assert not (tmp_path / "a" / REPORT_FILE).exists()
    assert folio_main(["report", str(tmp_path / "a"), "--x", "flops"]) == 0  # old runs: ok
    (tmp_path / "a" / "run.json").unlink()  # no run.json: still a card, from the metrics
    assert write_report([tmp_path / "a"]).is_file()


@pytest.mark.slow  # trains, then samples two runs
def test_training_writes_the_card_and_folio_report_compares_runs(char_data_dir, tmp_path,
                                                                  capsys):
    out = tmp_path / "tiny"
    assert folio_main(["train", *tiny_args(char_data_dir, out, max_iters=10, eval_interval=5,
                                            learning_rate=2e-3, report=True)]) == 0
    assert "report card:" in capsys.readouterr().out
    page = (out / REPORT_FILE).read_text()
    info = read_run_info(out)
    assert info.hardware and info.hardware["threads"] >= 1 and info.flops_per_token > 0
    assert info.wall_s > 0 and info.tokens_per_iter == 8 * 32
    assert info.hardware["cpu"] in page and "learning_rate" in page
    samples = json.loads((out / SAMPLES_FILE).read_text())
    assert samples["complete"] and [s["prompt"] for s in samples["samples"]][:2] == ["\n", "The "]
    assert samples["samples"][0]["text"] and samples["samples"][0]["text"] in page.replace(
        "&#x27;", "'").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace(
        "&quot;", '"')
    md = (out / REPORT_MD_FILE).read_text()
    assert "## Samples: tiny" in md and info.hardware["cpu"] in md
    # samples are kept while the weights stay the same: the same text at the same seed
    before = (out / SAMPLES_FILE).read_text()
    other = Path(shutil.copytree(out, tmp_path / "other"))
    (other / SAMPLES_FILE).unlink()
    assert folio_main(["report", str(out), str(other), "--out", str(tmp_path / "c.html")]) == 0
    assert (out / SAMPLES_FILE).read_text() == before
    assert json.loads((other / SAMPLES_FILE).read_text())["samples"] == \
        json.loads(before)["samples"]  # fixed prompts, fixed seed
    both = (tmp_path / "c.html").read_text()
    assert [r["name"] for r in data_of(both, "loss-")["runs"]] == ["tiny", "other"]
    assert (tmp_path / "c.md").is_file()


def test_folio_report_samples_a_trained_run_once(tiny_run, tmp_path, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "tiny"))
    for name in (SAMPLES_FILE, REPORT_FILE, REPORT_MD_FILE):
        (run / name).unlink(missing_ok=True)
    assert folio_main(["report", str(run)]) == 0
    assert f"wrote {run / REPORT_FILE}" in capsys.readouterr().out
    samples = (run / SAMPLES_FILE).read_text()
    assert json.loads(samples)["best_iter"] == read_run_info(run).best_iter
    page = (run / REPORT_FILE).read_text()
    assert page.count('<pre class="sample">') == len(json.loads(samples)["samples"]) >= 2
    assert "## Samples: tiny" in (run / REPORT_MD_FILE).read_text()
    mtime = (run / SAMPLES_FILE).stat().st_mtime_ns
    assert folio_main(["report", str(run), "--samples=False", "--x", "tokens"]) == 0
    assert (run / SAMPLES_FILE).stat().st_mtime_ns == mtime  # kept: the weights are the same
    assert data_of((run / REPORT_FILE).read_text(), "loss-")["xLabel"] == "tokens seen"


def test_a_budgeted_run_keeps_time_for_its_card():
    assert card_sample_seconds(None) == 1.5 and card_sample_seconds(600) == 1.5
    assert card_sample_seconds(60) == pytest.approx(0.6)  # 1% of a one-minute budget
    budget = Budget(60.0, clock=lambda: 0.0)
    without = budget.finish_s()
    budget.after_s = card_seconds(60.0)
    assert budget.finish_s() == pytest.approx(without + 0.6 + 0.3)
