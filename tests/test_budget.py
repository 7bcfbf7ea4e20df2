"""`folio train --time`: a run planned on the clock ends on time with a finished model; the
schedule follows the budget (checked with an injected clock); the recipe rule; bad budgets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from folio.cli import main
from folio.cli.args import parse_args
from folio.config import TrainConfig, parse_duration
from folio.machine.distributed import DistInfo
from folio.speed.kernels import Kernels
from folio.store import checkpoint
from folio.train import sizing
from folio.train.budget import Budget
from folio.train.loop import Trainer
from folio.train.optim import lr_at, muon_momentum_at
from folio.train.recipes import Machine, resolve


class StepClock:
    """A clock that moves `dt` seconds each time it is read: the same code path reads it the
    same number of times, so a run's schedule is a function of the budget alone."""

    def __init__(self, dt: float) -> None:
        self.now, self.dt = 0.0, dt

    def __call__(self) -> float:
        self.now += self.dt
        return self.now


# ---------------------------------------------------------------------------- the budget

def test_durations_parse_with_units():
    assert [parse_duration(t) for t in ("90s", "10m", "1.5h", "45")] == [90, 600, 5400, 45]


def test_progress_counts_what_the_end_needs_and_a_step_fits_only_with_room_for_it():
    clock = StepClock(0.0)
    budget = Budget(100.0, clock=clock, started=0.0)
    budget.record_eval(4.0)
    budget.record_save(1.0)  # the end needs 1.2 x 5 s = 6 s, and 0.5 s to exit
    clock.now = 47.0
    assert budget.progress() == pytest.approx(47 / 93.5)
    budget.record_step(2.0)
    clock.now = 91.5
    assert budget.step_fits()  # 91.5 + 2 + 6.5 = 100
    clock.now = 92.0
    assert not budget.step_fits()
    resumed = Budget(100.0, spent_before=60.0, clock=clock, started=92.0)
    assert resumed.elapsed() == pytest.approx(60.0) and resumed.left() == pytest.approx(40.0)


def test_the_budgeted_schedule_decays_to_its_floor_at_the_deadline():
    modern = TrainConfig(lr_schedule="wsd", warmdown_frac=0.5, learning_rate=0.01, min_lr=0.0,
                         warmup_iters=0, time="1m", max_iters=None)
    assert lr_at(10, modern, progress=0.3) == pytest.approx(0.01)  # before the warmdown
    assert lr_at(10, modern, progress=0.75) == pytest.approx(0.005)
    assert lr_at(10, modern, progress=1.0) == 0.0
    cosine = TrainConfig(time="1m", max_iters=None, warmup_iters=5)
    assert lr_at(2, cosine, progress=0.9) == pytest.approx(cosine.learning_rate * 3 / 6)
    assert lr_at(50, cosine, progress=1.0) == pytest.approx(cosine.min_lr)
    both = TrainConfig(time="1h", max_iters=100, warmup_iters=0)  # iterations end it first
    assert lr_at(100, both, progress=0.1) == pytest.approx(both.min_lr)
    muon = TrainConfig(time="1m", max_iters=None, muon_momentum_warmup=10_000)
    assert muon_momentum_at(5, muon, progress=0.3) == pytest.approx(muon.muon_momentum)


def budgeted_trainer(data_dir, out_dir, clock, **settings) -> Trainer:
    cfg = TrainConfig(**{**dict(
        dataset="shakespeare_char", data_dir=str(data_dir), out_dir=str(out_dir),
        device="cpu", n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
        bias=False, compile="False", dtype="float32", time="20s", max_iters=None,
        eval_interval=0, eval_iters=2, log_interval=1, lr_schedule="wsd", warmup_iters=0,
        min_lr=0.0, learning_rate=0.01, report=False), **settings})  # no card: no cli here
    return Trainer(cfg, DistInfo(), torch.device("cpu"), Kernels.for_device("cpu"),
                   clock=clock)


def lrs(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["lr"] for row in rows if row["kind"] == "train"]


def test_the_same_budget_and_step_times_give_the_same_schedule(char_data_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = budgeted_trainer(char_data_dir, tmp_path / name, StepClock(0.05))
        assert trainer.run() == 0
        runs.append(trainer)
    a, b = (lrs(tmp_path / name) for name in ("a", "b"))
    assert a == b and len(a) > 20
    assert a[0] == pytest.approx(0.01) and a[-1] < 0.001  # warmed down to the end
    assert all(x >= y for x, y in zip(a, a[1:], strict=False))  # never back up
    # it ended within the budget, with its final evaluation and best weights saved
    trainer = runs[0]
    assert trainer.budget.elapsed() == pytest.approx(20.0, rel=0.03)
    assert trainer.progress.evaluated_at == trainer.progress.iter_num
    assert (tmp_path / "a" / "model.safetensors").is_file()


def test_a_resumed_budgeted_run_goes_on_with_the_time_left(char_data_dir, tmp_path):
    first = budgeted_trainer(char_data_dir, tmp_path / "run", StepClock(0.05), max_iters=15)
    assert first.run() == 0  # the iterations end it first
    spent = checkpoint.load_resume(tmp_path / "run").time_spent
    assert 0 < spent < 20.0
    again = budgeted_trainer(char_data_dir, tmp_path / "run", StepClock(0.05),
                             init_from="resume")
    assert again.budget.spent_before == pytest.approx(spent)
    assert again.run() == 0
    assert again.progress.iter_num > 15
    assert again.budget.elapsed() == pytest.approx(20.0, rel=0.03)
    assert lrs(tmp_path / "run")[-1] < 0.001


# ---------------------------------------------------------------------------- the recipe rule

def resolved(*argv: str, device: str = "cpu") -> TrainConfig:
    parsed = parse_args(TrainConfig, list(argv), config_file=True)
    return resolve(parsed.config, parsed.given, device, source=parsed.source)[0]


def test_folio_chooses_the_modern_recipe_and_nanogpt_settings_keep_nanogpts(tmp_path):
    assert resolved().recipe == "modern"  # a bare folio train
    assert resolved("--time=2m").recipe == "modern"
    assert resolved("--time=2m", "--n_layer=3").recipe == "modern"
    seed = ["--dataset=shakespeare", "--n_layer=4", "--n_head=4", "--n_embd=64",
            "--block_size=64", "--batch_size=8", "--max_iters=2000", "--compile=False"]
    assert resolved(*seed) == TrainConfig(**{**parse_args(TrainConfig, seed).config.__dict__,
                                             "recipe": "nanogpt"})
    for preset in ("shakespeare_char", "shakespeare_char_cpu", "gpt2_124m",
                   "finetune_shakespeare"):
        assert resolved(preset).recipe == "nanogpt", preset
    config_py = tmp_path / "train_mine.py"
    config_py.write_text("n_layer = 2\nn_head = 2\nn_embd = 32\n", encoding="utf-8")
    assert resolved(str(config_py)).recipe == "nanogpt"
    assert resolved("--recipe=nanogpt").recipe == "nanogpt"  # either way
    assert resolved("shakespeare_char", "--recipe=modern").recipe == "modern"


def test_a_budget_with_no_shape_is_sized_and_says_why():
    parsed = parse_args(TrainConfig, ["--time=2m"])
    small = Machine(peak_flops=50e9, train_tokens=1_003_854, vocab_size=65)
    cfg, note = resolve(parsed.config, parsed.given, "cpu", machine=lambda cfg: small)
    assert cfg.max_iters is None and cfg.eval_interval == 0 and cfg.dataset == "shakespeare_char"
    assert f"{cfg.n_layer} layers, {cfg.n_embd} wide" in note and "tokens fit" in note
    fast = Machine(peak_flops=5e12, train_tokens=1_003_854, vocab_size=65)
    bigger, _ = resolve(parsed.config, parsed.given, "cpu", machine=lambda cfg: fast)
    assert bigger.n_layer > cfg.n_layer  # a faster device trains a bigger model
    given = parse_args(TrainConfig, ["--time=2m", "--n_layer=3"])
    mine, _ = resolve(given.config, given.given, "cpu", machine=lambda cfg: fast)
    assert mine.n_layer == 3  # a shape setting given wins


def test_a_budget_that_sees_its_data_many_times_gets_weight_decay_unless_given():
    many_epochs = Machine(peak_flops=5e12, train_tokens=1_003_854, vocab_size=65)
    parsed = parse_args(TrainConfig, ["--time=10m"])
    cfg, note = resolve(parsed.config, parsed.given, "cpu", machine=lambda cfg: many_epochs)
    assert cfg.weight_decay == sizing.WEIGHT_DECAY > 0 and "weight decay" in note
    mine = parse_args(TrainConfig, ["--time=10m", "--weight_decay=0.01"])
    assert resolve(mine.config, mine.given, "cpu",
                   machine=lambda cfg: many_epochs)[0].weight_decay == 0.01
    big_corpus = Machine(peak_flops=50e9, train_tokens=10**10, vocab_size=65)
    once, _ = resolve(parsed.config, parsed.given, "cpu", machine=lambda cfg: big_corpus)
    assert once.weight_decay == 0.0  # the modern recipe's: the data is not repeated


# ---------------------------------------------------------------------------- bad budgets

@pytest.mark.parametrize("time", ["0", "-5m", "abc", "10x", "nan"])
def test_a_bad_budget_is_a_one_line_error(time, capsys, tmp_path):
    assert main(["train", f"--time={time}", f"--out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("folio: error: time=") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_budget_with_eval_only_is_a_one_line_error(capsys, tmp_path):
    assert main(["train", "--time=1m", "--eval_only", f"--out_dir={tmp_path / 'run'}"]) == 2
    assert "--eval_only do not go together" in capsys.readouterr().err


def test_a_budget_too_short_for_one_step_says_the_shortest_that_works(char_data_dir, tmp_path,
                                                                      capsys):
    from conftest import tiny_args
    out = tmp_path / "run"
    assert main(["train", *tiny_args(char_data_dir, out), "--time=0.01s"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "too short to take one step" in err
    shortest = float(err.rsplit("--time=", 1)[1].rstrip("s"))
    assert math.isfinite(shortest) and shortest > 0.01
    assert not out.exists()  # nothing written


def test_a_bare_budgeted_run_decays_on_the_clock_not_the_cpu_presets_iterations():
    # regression: the CPU preset's lr_decay_iters = 2000 stayed in a bare `folio train
    # --time=10m`, so the learning rate reached zero at iteration 2000 (229 s of 600)
    parsed = parse_args(TrainConfig, ["--time=10m", "--device=cpu"], config_file=True)
    cfg = resolve(parsed.config, parsed.given, "cpu", source=parsed.source)[0]
    assert cfg.lr_decay_iters is None and cfg.max_iters is None
    assert lr_at(3000, cfg, progress=0.3) == cfg.learning_rate
    assert lr_at(3000, cfg, progress=0.75) == pytest.approx(cfg.learning_rate / 2)
