"""Tuning the CPU knobs on the run's own model: the run is the same whether it ran or not."""

from __future__ import annotations

import pytest
import torch

from folio.config import TrainConfig
from folio.machine.distributed import DistInfo
from folio.speed import training
from folio.train.loop import Trainer


def tiny_trainer(data_dir, out_dir, **settings) -> Trainer:
    cfg = TrainConfig(dataset="shakespeare_char", data_dir=str(data_dir), out_dir=str(out_dir),
                      device="cpu", n_layer=1, n_head=2, n_embd=16, block_size=16,
                      batch_size=4, dropout=0.1, bias=False, compile="False",
                      **{"max_iters": 600, **settings})
    return Trainer(cfg, DistInfo(), torch.device("cpu"))


def test_the_run_starts_the_same_whether_tuning_measured_or_not(char_data_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("FOLIO_CACHE", str(tmp_path / "cache"))
    tuned = tiny_trainer(char_data_dir, tmp_path / "a")
    rng_after_tuning = torch.get_rng_state()
    assert tuned.tuning.tuning_s > 0 and not tuned.tuning.cached
    assert tuned.tuning.line.endswith("measured") or "measured;" in tuned.tuning.line
    assert list((tmp_path / "cache" / "autotune").glob("*.json"))
    monkeypatch.setenv("FOLIO_CACHE", str(tmp_path / "empty"))
    plain = tiny_trainer(char_data_dir, tmp_path / "b", max_iters=10)  # too short: not measured
    assert plain.tuning.line == "float32: not measured"
    assert torch.equal(rng_after_tuning, torch.get_rng_state())
    for (name, a), (_, b) in zip(tuned.model.state_dict().items(),
                                 plain.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(tuned.loader.next_batch()[0], plain.loader.next_batch()[0])


def test_a_second_run_reuses_the_cached_choice(char_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FOLIO_CACHE", str(tmp_path / "cache"))
    first = tiny_trainer(char_data_dir, tmp_path / "a")
    again = tiny_trainer(char_data_dir, tmp_path / "b")
    assert again.tuning.cached and again.tuning.tuning_s == 0
    assert again.tuning.knobs == first.tuning.knobs and "cached 20" in again.tuning.line
    short = tiny_trainer(char_data_dir, tmp_path / "c", max_iters=10)  # too short to measure
    assert short.tuning.cached and short.tuning.knobs == first.tuning.knobs


def test_run_json_records_the_measured_choice(char_data_dir, tmp_path, monkeypatch):
    from folio.store.rundir import read_run_info

    monkeypatch.setenv("FOLIO_CACHE", str(tmp_path / "cache"))
    trainer = tiny_trainer(char_data_dir, tmp_path / "a")
    trainer.write_info()
    recorded = read_run_info(tmp_path / "a").tuning
    assert recorded["choice"] == trainer.tuning.name and not recorded["cached"]
    assert recorded["knobs"] == trainer.tuning.knobs
    assert recorded["speedup"] == round(trainer.tuning.speedup, 3)
    assert set(recorded["ms_per_step"]) == set(trainer.tuning.ms_per_step)
    monkeypatch.setenv("FOLIO_CACHE", str(tmp_path / "empty"))
    untuned = tiny_trainer(char_data_dir, tmp_path / "b", max_iters=10)  # not measured
    untuned.write_info()
    assert read_run_info(tmp_path / "b").tuning["choice"] == untuned.tuning.name


def test_explicit_dtype_is_never_a_candidate():
    explicit = training.candidates("float32", "adamw", 1 << 20)
    assert {k["dtype"] for k in explicit.values()} == {"float32"}
    auto = training.candidates("auto", "adamw", 1 << 20)
    assert next(iter(auto.values())) == training.REFERENCE


def test_the_full_logits_loss_is_a_candidate_only_while_its_logits_are_small():
    char = 4 * 64 * 256 * 65  # batch 64 x 256 tokens, 65-token vocabulary: 4.3 MB of logits
    assert {k["fused_loss"] for k in training.candidates("float32", "adamw", char).values()} \
        == {True, False}
    bpe = 4 * 8 * 64 * 50304  # batch 8 x 64, GPT-2's vocabulary: 103 MB of logits
    assert [k["fused_loss"] for k in training.candidates("float32", "adamw", bpe).values()] \
        == [True]


def test_newton_schulz_dtype_is_a_candidate_only_for_muon_on_a_bf16_cpu():
    from folio.machine.device import cpu_supports_bf16

    adamw = training.candidates("float32", "adamw", 1 << 20)
    assert all("newton_schulz" not in knobs for knobs in adamw.values())
    muon = training.candidates("float32", "muon", 1 << 20)
    assert next(iter(muon.values()))["newton_schulz"] == "float32"  # the reference
    assert {k["newton_schulz"] for k in muon.values()} == \
        ({"float32", "bfloat16"} if cpu_supports_bf16() else {"float32"})
    assert training.ns_dtype({"newton_schulz": "bfloat16"}) == torch.bfloat16
    assert training.ns_dtype({"dtype": "float32"}) is None


@pytest.mark.slow
def test_a_resumed_run_keeps_its_measured_choice(char_data_dir, tmp_path, monkeypatch, capsys):
    """Regression: a resume with too few iterations left to measure fell back to the
    reference kernels, so it did not go on as the run it resumed."""
    from conftest import tiny_args

    from folio.cli import main
    from folio.store.rundir import read_run_info

    monkeypatch.setenv("FOLIO_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", *tiny_args(char_data_dir, run, max_iters=500, eval_interval=500)]) == 0
    first = read_run_info(run).tuning
    assert "measured" in capsys.readouterr().out and not first["cached"]
    (tmp_path / "cache").rename(tmp_path / "gone")  # nothing cached to fall back on
    assert main(["train", *tiny_args(char_data_dir, run, max_iters=510, eval_interval=500),
                 "--init_from=resume"]) == 0
    assert f"{first['choice']}: kept from the run resumed" in capsys.readouterr().out
    assert read_run_info(run).tuning["knobs"] == first["knobs"]
