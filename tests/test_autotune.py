"""The measured choice of speed knobs: picks the faster safe candidate, caches per machine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from folio.speed import autotune
from folio.speed.autotune import Measurement

CANDIDATES = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"}}
KEY = autotune.cache_key({"n_layer": 2, "n_embd": 32}, {"batch_size": 4, "block_size": 16},
                         "cpu", CANDIDATES)


class FakeTimers:
    """Candidates whose steps 'take' a set time and reach a set loss; counts the steps run."""

    def __init__(self, ms: dict[str, float], loss: dict[str, float] | None = None):
        self.ms, self.loss = ms, loss or {}
        self.steps = {name: 0 for name in ms}
        self.built: list[str] = []

    def build(self, name: str):
        self.built.append(name)

        def time_steps(n: int) -> Measurement:
            self.steps[name] += n
            return Measurement([self.ms[name] / 1000] * n, self.loss.get(name, 4.0))
        return time_steps


def choose(timers: FakeTimers, tmp_path, candidates=CANDIDATES, key=KEY, **kw):
    return autotune.choose(candidates, timers.build, key, planned_steps=2000,
                           cache_root=tmp_path, **kw)


def test_the_measured_faster_candidate_is_chosen(tmp_path):
    timers = FakeTimers({"float32": 50.0, "bfloat16": 25.0})
    choice = choose(timers, tmp_path)
    assert choice.name == "bfloat16" and choice.knobs == {"dtype": "bfloat16"}
    assert choice.speedup == 2.0 and not choice.cached
    assert choice.line == "bfloat16: 2.00x float32, measured"
    # both ran the same steps: a warm-up step, then interleaved timed rounds
    assert timers.steps["float32"] == timers.steps["bfloat16"] >= 2


def test_a_slower_candidate_keeps_the_reference(tmp_path):
    choice = choose(FakeTimers({"float32": 40.0, "bfloat16": 60.0}), tmp_path)
    assert choice.name == "float32" and choice.line == "float32: fastest, measured"


def test_a_gain_within_noise_keeps_the_reference(tmp_path):
    choice = choose(FakeTimers({"float32": 50.0, "bfloat16": 49.5}), tmp_path)
    assert choice.name == "float32"


@pytest.mark.parametrize("bad_loss", [math.nan, math.inf, 4.5])
def test_a_candidate_with_a_non_finite_or_distant_loss_is_rejected(tmp_path, bad_loss):
    timers = FakeTimers({"float32": 50.0, "bfloat16": 10.0},
                        loss={"float32": 4.0, "bfloat16": bad_loss})
    choice = choose(timers, tmp_path)
    assert choice.name == "float32"
    assert "rejected bfloat16" in choice.line


def test_a_loss_within_tolerance_is_safe(tmp_path):
    timers = FakeTimers({"float32": 50.0, "bfloat16": 10.0},
                        loss={"float32": 4.0, "bfloat16": 4.05})
    assert choose(timers, tmp_path).name == "bfloat16"


def test_one_candidate_left_on_auto_is_not_measured(tmp_path):
    """Explicit settings are not candidates: with nothing left to choose, nothing is timed."""
    timers = FakeTimers({"bfloat16": 25.0})
    choice = choose(timers, tmp_path, candidates={"bfloat16": {"dtype": "bfloat16"}})
    assert choice.name == "bfloat16" and timers.built == [] and not list(tmp_path.iterdir())


def test_a_cached_decision_is_reused_without_timing(tmp_path):
    first = choose(FakeTimers({"float32": 50.0, "bfloat16": 25.0}), tmp_path)
    again = FakeTimers({"float32": 50.0, "bfloat16": 100.0})  # would now pick float32
    choice = choose(again, tmp_path)
    assert again.built == [] and sum(again.steps.values()) == 0
    assert choice.cached and choice.name == first.name == "bfloat16"
    assert choice.line.startswith("bfloat16: 2.00x float32, cached 20")


def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    path = autotune.cache_path(KEY, tmp_path)
    path.write_text('{"version": 1, "choice": ')
    timers = FakeTimers({"float32": 50.0, "bfloat16": 25.0})
    assert choose(timers, tmp_path).name == "bfloat16" and timers.built
    saved = json.loads(path.read_text())
    assert saved["choice"] == "bfloat16" and saved["key"] == json.loads(json.dumps(KEY))


def test_a_cache_entry_for_other_candidates_is_not_used(tmp_path):
    path = autotune.cache_path(KEY, tmp_path)
    choose(FakeTimers({"float32": 50.0, "bfloat16": 25.0}), tmp_path)
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "choice": "float16"}))  # not a candidate
    timers = FakeTimers({"float32": 50.0, "bfloat16": 25.0})
    assert not choose(timers, tmp_path).cached and timers.built


@pytest.mark.parametrize("change", ["cpu", "torch", "shape", "batch", "device", "threads",
                                    "candidates"])
def test_the_cache_key_changes_with_each_component(change):
    changed = json.loads(json.dumps(KEY))
    changed[change] = {"changed": True}
    assert autotune.cache_path(changed) != autotune.cache_path(KEY)


def test_the_key_names_the_cpu_model_and_its_speed_flags():
    cpu = KEY["cpu"]
    assert cpu["model"] and cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(cpu["flags"]) <= set(autotune.SPEED_FLAGS)
    assert KEY["torch"] == torch.__version__ and KEY["device"] == "cpu"


def test_measuring_is_sized_by_the_planned_run_and_capped_by_the_budget(tmp_path):
    """A warm-up step each, then rounds that fit 2% of the planned run (50 ms + 25 ms a
    round-step), at least three rounds of one step, at most 10 s."""
    def steps_for(planned: int) -> dict[str, int]:
        timers = FakeTimers({"float32": 50.0, "bfloat16": 25.0})
        autotune.choose(CANDIDATES, timers.build, KEY, planned_steps=planned,
                        cache_root=tmp_path / str(planned))
        return timers.steps
    assert steps_for(500) == {"float32": 4, "bfloat16": 4}  # 2% of 25 s: the minimum
    assert steps_for(2000) == {"float32": 1 + 5 * 2, "bfloat16": 11}  # 2% of 50 s: 1 s
    assert steps_for(10**7) == {"float32": 1 + 5 * 3, "bfloat16": 16}  # the 10 s cap


def test_a_candidate_far_slower_on_its_first_step_is_not_timed_further(tmp_path):
    """Long steps: a candidate over twice the fastest's first step drops out after it; the
    reference (whose loss the others are checked against) never does; the rounds fit 2%."""
    candidates = {**CANDIDATES, "slow": {"dtype": "float16"}}
    timers = FakeTimers({"float32": 3000.0, "bfloat16": 1000.0, "slow": 5000.0})
    choice = autotune.choose(candidates, timers.build, KEY | {"candidates": "slow"},
                             planned_steps=500, cache_root=tmp_path)
    # 2% of 500 s: two rounds of float32 + bfloat16 (4 s), not three
    assert timers.steps == {"float32": 3, "bfloat16": 3, "slow": 1}
    assert choice.name == "bfloat16" and choice.ms_per_step["slow"] is None
