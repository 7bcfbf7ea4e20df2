"""The measured choice of CPU training knobs left on `auto`, on the run's own plain model.

Each candidate is a copy of the plain model with its kernels applied (kernels.py), trained a
few steps on real batches by the training loop's own step function (which the caller passes
in), then thrown away: the run starts from the untouched model and the RNG state it had
before, so it is the same run, bit for bit, whether tuning ran, was cached, or was skipped.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from typing import Any

import torch

from folio.machine.device import DTYPES, cpu_supports_bf16
from folio.model.gpt import GPT
from folio.speed import autotune, kernels

STEPS_PER_CANDIDATE = 2  # measuring costs at least a warm-up and a timed step per candidate;
# a run too short for that to fit RUN_FRACTION of it uses a cached choice or the reference
BATCHES = 8  # real training batches, cycled, that every candidate sees in the same order
LOGITS_LIMIT_BYTES = 32 << 20  # above this the (B*T, V) float32 logits are never a candidate: the
# fused loss was 1.6x faster at 103 MB of them (seed_bpe, Zen 5), and measuring the plain one
# held ~400 MB more than the run itself
# Where knobs left on auto run from (the reference is the first: folio's previous CPU path)
REFERENCE = {"dtype": "float32", "fused_loss": True}

# make_step(model, knobs) -> one training step of `model` on the batch given, returning its loss
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MakeStep = Callable[[GPT, dict[str, Any]], StepFn]


def candidates(dtype: str, optimizer: str, logits_bytes: int) -> dict[str, dict[str, Any]]:
    """{name: knobs} for the knobs the settings leave on auto; the first is the reference.

    `dtype`: the dtype setting ("auto" measures float32 and, where the CPU has bfloat16 matmul,
    bfloat16); `optimizer`: Muon adds its Newton-Schulz dtype as a knob; `logits_bytes`: the
    float32 (B*T, V) logits of one batch. The plain loss (nanoGPT's full logits) is a
    candidate only while those stay small: the fused loss never holds them in float32.

    compile=auto is not a candidate on a CPU: inductor takes 25-65 s to compile, more than the
    whole measuring budget, and its steps were no faster in float32 (issue 15's profile).
    """
    bf16 = ["bfloat16"] if cpu_supports_bf16() else []
    fused_options = [True, False] if logits_bytes <= LOGITS_LIMIT_BYTES else [True]
    dtypes = ["float32", *bf16] if dtype == "auto" else [dtype]
    # Muon's Newton-Schulz iteration is its own matmul-bound step: its dtype is a knob too
    ns_dtypes = ["float32", *bf16] if optimizer == "muon" else [None]
    found = {}
    for fused, dtype_name, ns in itertools.product(fused_options, dtypes, ns_dtypes):
        knobs = {"dtype": dtype_name, "fused_loss": fused}
        name = dtype_name + ("" if fused else " + logits loss")
        if ns:
            knobs["newton_schulz"] = ns
            name += "" if ns == "float32" else f" + {ns} Newton-Schulz"
        found[name] = knobs
    return found


def cpu_kernels(knobs: dict[str, Any]) -> kernels.Kernels:
    """The CPU's kernels with the loss `knobs` choose."""
    return kernels.Kernels(fused_loss=knobs["fused_loss"], fast_dropout=True,
                           float32_attention=True)


def ns_dtype(knobs: dict[str, Any]) -> torch.dtype | None:
    """Muon's Newton-Schulz dtype the knobs choose (None: the optimizer's default)."""
    return DTYPES[knobs["newton_schulz"]] if "newton_schulz" in knobs else None


def kept_choice(found: dict[str, dict[str, Any]], kept: dict[str, Any] | None
                ) -> autotune.Choice | None:
    """The choice a resumed run's run.json records, while it is still a candidate: a resumed
    run goes on with the same kernels however few iterations remain."""
    name = (kept or {}).get("choice")
    if name in found and found[name] == kept.get("knobs"):
        return autotune.Choice(name, found[name], f"{name}: kept from the run resumed",
                               float(kept.get("speedup", 1.0)), cached=True)
    return None


def choose(model: GPT, found: dict[str, dict[str, Any]], make_step: MakeStep,
           batches: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]],
           key: dict[str, Any], planned_steps: int | None, seed: int,
           planned_s: float | None = None) -> autotune.Choice:
    """The fastest safe candidate for training the plain `model` (not yet wrapped), from the
    cache or measured when `planned_steps` leave room for it (else the reference).

    Each candidate trains a copy of `model` with `make_step`, on the same `batches()` (read
    only when measuring) and the same dropout draws. A budgeted run gives `planned_s`, the
    seconds it has left (`planned_steps` None: no iteration limit).
    """
    fixed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def timer(name: str) -> autotune.TimeSteps:
        twin = kernels.apply(copy.deepcopy(model), cpu_kernels(found[name])).train()
        step = make_step(twin, found[name])
        fixed.extend([] if fixed else batches())
        done = 0

        def time_steps(n: int) -> autotune.Measurement:
            nonlocal done
            seconds, loss = [], torch.zeros(())
            for _ in range(n):
                x, y = fixed[done % len(fixed)]
                torch.manual_seed(seed + done)  # the same dropout draws for every candidate
                t0 = time.perf_counter()
                loss = step(x, y)
                seconds.append(time.perf_counter() - t0)
                done += 1
            return autotune.Measurement(seconds, loss.item())
        return time_steps

    long_enough = (planned_steps is None
                   or planned_steps * autotune.RUN_FRACTION >= STEPS_PER_CANDIDATE * len(found))
    with torch.random.fork_rng(devices=[]):  # the run's RNG is as if tuning never ran
        return autotune.choose(found, timer, key, planned_steps, may_measure=long_enough,
                               planned_s=planned_s)
