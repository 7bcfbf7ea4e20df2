"""Tuning the CPU knobs on the run's own model: the run is the same whether it ran or not."""

from __future__ import annotations

import torch

from folio.config import TrainConfig
from folio.machine.distributed import DistInfo
from folio.train import autotune_step
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
    untuned = tiny_trainer(char_data_dir, tmp_path / "b", max_iters=10)  # not measured
    untuned.write_info()
    assert read_run_info(tmp_path / "b").tuning["choice"] == untuned.tuning.name


def test_explicit_dtype_is_never_a_candidate():
    cfg = TrainConfig(dtype="float32")
    assert {k["dtype"] for k in autotune_step.candidates(cfg, 65).values()} == {"float32"}
    auto = autotune_step.candidates(TrainConfig(dtype="auto"), 65)
    assert next(iter(auto.values())) == autotune_step.REFERENCE


def test_the_full_logits_loss_is_a_candidate_only_while_its_logits_are_small():
    small = TrainConfig(dtype="float32", batch_size=8, block_size=64)
    assert {k["fused_loss"] for k in autotune_step.candidates(small, 50304).values()} \
        == {True, False}
    big = TrainConfig(dtype="float32", batch_size=64, block_size=256)  # 3.3 GB of logits
    assert [k["fused_loss"] for k in autotune_step.candidates(big, 50304).values()] == [True]
