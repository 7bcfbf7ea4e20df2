"""`folio plot`: the drawn series equal the metrics, several runs, pasted logs, HTML, errors."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_metrics import NANOGPT_LOG, log_rows

from folio.cli import main as folio_main
from folio.store.rundir import RunInfo, read_run_info, write_run_info
from folio.watch.chart import ema, format_count, make_chart
from folio.watch.metrics import MetricsLog, parse_log, read_metrics
from folio.watch.plot import make_figure, plot_png
from folio.watch.plot_html import render_html

MODEL = {"block_size": 32, "vocab_size": 65, "n_layer": 2, "n_head": 2, "n_embd": 32,
         "dropout": 0.0, "bias": True}
N_PARAMS = 29_568  # GPT(MODEL).num_params(), as training records it in run.json


def jsonl_rows(run_dir: Path, kind: str) -> list[dict]:
    """Rows straight from the file, independent of read_metrics."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def lines_by_gid(fig) -> dict:
    return {line.get_gid(): line for line in fig.axes[0].get_lines()}


def make_run(path: Path, model: dict | None = MODEL, dataset: str = "shakespeare_char",
             **kw) -> Path:
    """A run dir with metrics.jsonl and (unless `model` is None) a run.json."""
    path.mkdir(parents=True)
    if model is not None:
        write_run_info(path, RunInfo(model=model, n_params=N_PARAMS, dataset=dataset,
                                     tokenizer={"kind": "gpt2"}))
    with MetricsLog(path, console=False, plot_every_eval=False) as log:
        log_rows(log, **kw)
    return path


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A writable copy of the trained tiny run."""
    return Path(shutil.copytree(tiny_run, tmp_path / "tiny"))


def test_plotted_series_equal_the_metrics_file(run_copy, tmp_path):
    fig = plot_png([read_metrics(run_copy)], tmp_path / "out.png", smooth=3)
    lines, train, evals = lines_by_gid(fig), jsonl_rows(run_copy, "train"), \
        jsonl_rows(run_copy, "eval")
    assert len(train) >= 8 and len(evals) == 3
    np.testing.assert_array_equal(lines["tiny:train"].get_xdata(), [r["iter"] for r in train])
    np.testing.assert_array_equal(lines["tiny:train"].get_ydata(), [r["loss"] for r in train])
    np.testing.assert_allclose(lines["tiny:smooth"].get_ydata(),
                               ema(np.array([r["loss"] for r in train]), 3))
    np.testing.assert_array_equal(lines["tiny:val"].get_xdata(), [r["iter"] for r in evals])
    np.testing.assert_array_equal(lines["tiny:val"].get_ydata(), [r["val_loss"] for r in evals])
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"


def test_png_is_labelled_for_a_reader(run_copy):
    ax = make_figure(make_chart([read_metrics(run_copy)])).axes[0]
    title = ax.get_title()
    n_params = read_run_info(run_copy).n_params  # recorded by training
    assert title.startswith(f"tiny · {format_count(n_params)} params, 2L/2H/32d")
    assert "shakespeare_char" in title
    assert ax.get_xlabel() == "iteration" and "loss" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["train loss (raw)", "train loss, smoothed (EMA span 5)"]
    assert labels[2].startswith("val loss (best ")
    assert ax.xaxis.get_gridlines()[0].get_visible()


def test_folio_plot_writes_loss_png_into_a_single_run_dir(run_copy, capsys):
    (run_copy / "loss.png").unlink()
    assert folio_main(["plot", str(run_copy)]) == 0
    assert (run_copy / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("x, key", [("tokens", "tokens"), ("time", "time_s")])
def test_x_axis_can_be_tokens_or_wall_time(tmp_path, x, key):
    run = make_run(tmp_path / "a")
    fig = make_figure(make_chart([read_metrics(run)], x))
    lines = lines_by_gid(fig)
    np.testing.assert_allclose(lines["a:train"].get_xdata(),
                               [r[key] for r in jsonl_rows(run, "train")])
    np.testing.assert_allclose(lines["a:val"].get_xdata(),
                               [r[key] for r in jsonl_rows(run, "eval")])
    assert fig.axes[0].get_xlabel() == {"tokens": "tokens seen", "time": "wall time (s)"}[x]


def test_long_runs_show_wall_time_in_hours(tmp_path):
    m = read_metrics(make_run(tmp_path / "a"))
    for r in m.train + m.eval:
        r["time_s"] *= 10_000
    fig = make_figure(make_chart([m], "time"))
    assert fig.axes[0].get_xlabel() == "wall time (h)"
    np.testing.assert_allclose(lines_by_gid(fig)["a:train"].get_xdata(),
                               [r["time_s"] / 3600 for r in m.train])


def test_logy_uses_a_log_scale(tmp_path):
    fig = make_figure(make_chart([read_metrics(make_run(tmp_path / "a"))], logy=True))
    assert fig.axes[0].get_yscale() == "log"


def test_ema_is_bias_corrected_and_span_one_is_the_raw_curve():
    np.testing.assert_allclose(ema(np.full(20, 3.0), 7), 3.0)
    y = np.array([4.0, 3.0, np.nan, 2.0])
    np.testing.assert_array_equal(ema(y, 1), [4.0, 3.0, 3.0, 2.0])
    assert ema(y, 3)[0] == 4.0  # no pull towards zero at the start


def test_several_runs_are_overlaid_with_a_legend_entry_each(tmp_path):
    a = make_run(tmp_path / "small")
    b = make_run(tmp_path / "wide", model={**MODEL, "n_embd": 64}, iters=range(0, 90, 10))
    assert folio_main(["plot", str(a), str(b), "-o", str(tmp_path / "both.png")]) == 0
    chart = make_chart([read_metrics(a), read_metrics(b)])
    ax = make_figure(chart).axes[0]
    assert ax.get_title() == "2 runs · shakespeare_char"  # the shared part
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(s.startswith("small (") and "2L/2H/32d): train loss" in s for s in labels)
    assert any(s.startswith("wide (") and "2L/2H/64d): val loss" in s for s in labels)
    lines = lines_by_gid(make_figure(chart))
    assert len(lines["wide:train"].get_xdata()) == 9 and len(lines["small:train"].get_xdata()) == 5
    assert lines["wide:train"].get_color() != lines["small:train"].get_color()


def test_runs_with_the_same_dir_name_are_told_apart_by_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "x" / "out")
    make_run(tmp_path / "y" / "out")
    assert folio_main(["plot", "x/out", "y/out", "--html", "both.html"]) == 0
    names = [r["name"] for r in html_data((tmp_path / "both.html").read_text())["runs"]]
    assert names == ["x/out", "y/out"] and (tmp_path / "loss.png").is_file()


def test_a_run_without_run_json_still_plots(tmp_path):
    run = make_run(tmp_path / "bare", model=None)
    assert make_figure(make_chart([read_metrics(run)])).axes[0].get_title() == "bare"


def test_a_run_json_without_a_parameter_count_leaves_it_out_of_the_title(tmp_path):
    run = make_run(tmp_path / "old")
    info = json.loads((run / "run.json").read_text())
    del info["n_params"]  # as folio wrote run.json before it recorded the count
    (run / "run.json").write_text(json.dumps(info))
    title = make_figure(make_chart([read_metrics(run)])).axes[0].get_title()
    assert title == "old · 2L/2H/32d · shakespeare_char"


PLOT_IN_A_FRESH_PROCESS = """
import sys
from folio.cli import main
assert main(["plot", *sys.argv[1:]]) == 0
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "safetensors")))
"""


def test_folio_plot_of_a_finished_run_does_not_import_torch(run_copy, tmp_path):
    (run_copy / "loss.png").unlink()
    out = subprocess.run([sys.executable, "-c", PLOT_IN_A_FRESH_PROCESS, str(run_copy),
                          "--html", str(tmp_path / "p.html")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]"
    assert (run_copy / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "p.html").is_file()


def test_the_loss_png_refresher_does_not_import_torch(run_copy, monkeypatch, capfd):
    """The child process that redraws loss.png during training, as training starts it."""
    (run_copy / "loss.png").unlink()
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # the child lists every import on stderr
    with MetricsLog(run_copy, console=False) as log:
        log.log_eval(45, 0, 1.0, 2.5, 2.6)
    imported = [line.rsplit("|", 1)[-1].strip() for line in capfd.readouterr().err.splitlines()
                if line.startswith("import time:")]
    assert "folio.watch.plot" in imported
    assert [m for m in imported if m.split(".")[0] in ("torch", "safetensors")] == []
    assert (run_copy / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_folio_plot_dash_reads_a_pasted_nanogpt_log_from_stdin(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(NANOGPT_LOG))
    monkeypatch.chdir(tmp_path)
    assert folio_main(["plot", "-", "--html", "loss.html"]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    run = html_data((tmp_path / "loss.html").read_text())["runs"][0]
    assert run["name"] == "stdin"
    assert [p[:2] for p in run["train"]] == [[0, 4.2654], [10, 3.2457], [20, 2.7914],
                                            [240, 2.0539], [250, 1.9985], [260, 1.9682]]
    assert [p[:2] for p in run["eval"]] == [[0, 4.2823], [250, 2.0516]]


def test_a_log_file_is_parsed_and_named_after_the_file(tmp_path):
    (tmp_path / "nano.log").write_text(NANOGPT_LOG)
    assert folio_main(["plot", str(tmp_path / "nano.log"), "-o", str(tmp_path / "p.png"),
                       "--logy"]) == 0
    chart = make_chart([parse_log(NANOGPT_LOG, name="nano")])
    np.testing.assert_array_equal(chart.runs[0].eval_y, [4.2823, 2.0516])


def html_data(page: str) -> dict:
    m = re.search(r'<script id="folio-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_html_is_self_contained_and_holds_the_plotted_data(run_copy, tmp_path):
    out = tmp_path / "loss.html"
    assert folio_main(["plot", str(run_copy), "--html", str(out)]) == 0
    page = out.read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page)
    assert not re.search(r"<link\b", page) and "https://" not in page
    assert "@import" not in page and "url(http" not in page
    # the only http:// is the SVG namespace name, which is never fetched
    assert set(re.findall(r"http://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}
    run = html_data(page)["runs"][0]
    train, evals = jsonl_rows(run_copy, "train"), jsonl_rows(run_copy, "eval")
    assert [p[0] for p in run["train"]] == [r["iter"] for r in train]
    assert [p[1] for p in run["train"]] == [r["loss"] for r in train]
    assert [(p[0], p[1], p[3]) for p in run["eval"]] == \
        [(r["iter"], r["val_loss"], r["train_loss"]) for r in evals]


def test_html_escapes_a_run_name_that_looks_like_markup(tmp_path):
    m = read_metrics(make_run(tmp_path / "a"))
    m.name = "</script><script>alert(1)</script>"
    page = render_html(make_chart([m]))
    assert "</script><script>alert" not in page
    assert html_data(page)["runs"][0]["name"] == m.name


# A minimal DOM, enough to run the page's script under node: draw, hover, hide a run.
DOM_SHIM = r"""
const fs = require("fs");
const html = fs.readFileSync(process.argv[1], "utf8");
const ids = {};
class El {
  constructor(tag) { Object.assign(this, {tag, children: [], style: {}, listeners: {},
    _text: "", offsetWidth: 100, classList: {toggle() {}}}); }
  setAttribute(k, v) { if (k === "id") ids[v] = this; }
  appendChild(c) { this.children.push(c); return c; }
  addEventListener(t, f) { this.listeners[t] = f; }
  set textContent(t) { this.children = []; this._text = t; }
  get textContent() { return this._text; }
  getBoundingClientRect() { return {left: 0, top: 0, width: 1000, height: 560}; }
}
for (const id of ["title", "legend", "wrap", "chart", "tip", "span"]) ids[id] = new El(id);
const data = html.match(/<script id="folio-data"[^>]*>([\s\S]*?)<\/script>/)[1];
ids["folio-data"] = new El("script"); ids["folio-data"].textContent = data;
global.document = {getElementById: id => ids[id] || null, createElementNS: (ns, t) => new El(t),
                   createElement: t => new El(t)};
eval(html.match(/<script>([\s\S]*?)<\/script>/)[1]);
const count = (e, tag) =>
  (e.tag === tag ? 1 : 0) + e.children.reduce((n, c) => n + count(c, tag), 0);
const out = {paths: count(ids.chart, "path"), circles: count(ids.chart, "circle")};
ids.hit.listeners.mousemove({clientX: 500, clientY: 200});
out.tip = ids.tip.innerHTML;
ids.legend.children[0].listeners.click();
out.pathsAfterHide = count(ids.chart, "path");
console.log(JSON.stringify(out));
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("logy", [False, True])
def test_html_script_draws_the_runs_and_shows_values_on_hover(tmp_path, logy):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", iters=range(0, 90, 10))
    page = tmp_path / "p.html"
    page.write_text(render_html(make_chart([read_metrics(a), read_metrics(b)], logy=logy)))
    result = subprocess.run(["node", "-e", DOM_SHIM, str(page)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["paths"] == 6 and out["circles"] == 3 + 5  # raw, smoothed, val line per run
    # the mouse is at x = 40.9: both runs report their train point at iteration 40
    assert out["tip"].count("iteration 40: train loss") == 2
    assert out["pathsAfterHide"] == 3


def test_a_run_dir_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert folio_main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no metrics.jsonl" in err and "folio: error:" in err


@pytest.mark.parametrize("text", ["", "Traceback (most recent call last):\nnothing here\n"])
def test_an_empty_or_unparseable_log_says_which_lines_were_expected(tmp_path, capsys, text):
    (tmp_path / "train.log").write_text(text)
    assert folio_main(["plot", str(tmp_path / "train.log"), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "iter 3347: loss 3.4083" in err and "step 250" in err
    assert not (tmp_path / "o.png").exists()


def test_a_missing_input_is_a_one_line_error(tmp_path, capsys):
    assert folio_main(["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "o.png")]) == 2
    assert "no such run dir or log file" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["-o", "--html"])
def test_an_unwritable_output_fails_before_drawing_and_writes_nothing(tmp_path, capsys, option):
    run = make_run(tmp_path / "a")
    before = sorted(p.name for p in run.iterdir())
    assert folio_main(["plot", str(run), option, str(tmp_path / "no" / "dir" / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert sorted(p.name for p in run.iterdir()) == before  # no loss.png, no temp files
    assert folio_main(["plot", str(run), option, str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_tokens_axis_for_a_nanogpt_log_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "nano.log").write_text(NANOGPT_LOG)
    assert folio_main(["plot", str(tmp_path / "nano.log"), "--x", "tokens"]) == 2
    assert "--x iter" in capsys.readouterr().err


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    run = make_run(tmp_path / "a")
    assert folio_main(["plot", str(run), "--x", "epochs"]) == 2
    assert folio_main(["plot", str(run), "--smooth", "0"]) == 2
    assert folio_main(["plot"]) == 2
    assert all(line.startswith("folio: error:") for line in
               capsys.readouterr().err.strip().splitlines())
