"""The measured choice of CPU training knobs left on `auto`, from the run's own model and data.

Each candidate is a copy of the freshly built model with its knobs applied, trained a few steps
on real batches with the run's optimizer settings, then thrown away: the run itself starts from
the untouched model and the RNG state it had before tuning, so it is the same run, bit for bit,
whether tuning ran, was cached, or was skipped.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

import torch

from folio.config import AUTO, TrainConfig
from folio.data.loader import Loader, open_tokens
from folio.machine import autotune
from folio.machine.device import DTYPES, autocast, cpu_supports_bf16
from folio.model.gpt import GPT
from folio.store.weights import gpt_from_state
from folio.train.optim import configure_optimizer

STEPS_PER_CANDIDATE = 2  # measuring costs at least a warm-up and a timed step per candidate;
# a run too short for that to fit RUN_FRACTION of it uses a cached choice or the reference
BATCHES = 8  # real training batches, cycled, that every candidate sees in the same order
LOGITS_LIMIT_BYTES = 32 << 20  # above this the (B*T, V) float32 logits are never a candidate: the
# fused loss was 1.6x faster at 103 MB of them (seed_bpe, Zen 5), and measuring the plain one
# held ~400 MB more than the run itself
# Where knobs left on auto run from (the reference is the first: folio's previous CPU path)
REFERENCE = {"dtype": "float32", "fused_loss": True}


def candidates(cfg: TrainConfig, vocab: int) -> dict[str, dict[str, Any]]:
    """{name: knobs} for the knobs `cfg` leaves on auto; the first is the reference.

    The plain loss (nanoGPT's full (B*T, V) logits) is a candidate only while those logits
    stay small: the fused loss never holds them in float32, so large ones stay out of memory.

    compile=auto is not a candidate on a CPU: inductor takes 25-65 s to compile, more than the
    whole measuring budget, and its steps were no faster in float32 (issue 15's profile).
    """
    small_logits = 4 * cfg.batch_size * cfg.block_size * vocab <= LOGITS_LIMIT_BYTES
    bf16 = ["bfloat16"] if cpu_supports_bf16() else []
    fused_options = [True, False] if small_logits else [True]
    dtypes = ["float32", *bf16] if cfg.dtype == AUTO else [cfg.dtype]
    # Muon's Newton-Schulz iteration is its own matmul-bound step: its dtype is a knob too
    ns_dtypes = ["float32", *bf16] if cfg.optimizer == "muon" else [None]
    found = {}
    for fused, dtype, ns in itertools.product(fused_options, dtypes, ns_dtypes):
        knobs = {"dtype": dtype, "fused_loss": fused}
        name = dtype + ("" if fused else " + logits loss")
        if ns:
            knobs["newton_schulz"] = ns
            name += "" if ns == "float32" else f" + {ns} Newton-Schulz"
        found[name] = knobs
    return found


def build_with(model: GPT, knobs: dict[str, Any], copy: bool = False) -> GPT:
    """A model built with the kernels `knobs` choose, holding `model`'s weights (shared, or
    copied with `copy`); the CPU's cheap attention dropout stays as `model` has it."""
    kernels = dataclasses.replace(model.kernels, fused_loss=knobs["fused_loss"])
    state = model.state_dict()
    if copy:
        state = {k: v.detach().clone() for k, v in state.items()}
    return gpt_from_state(model.config, state, "the model being tuned", kernels)


def ns_dtype(knobs: dict[str, Any]) -> torch.dtype | None:
    """Muon's Newton-Schulz dtype the knobs choose (None: the optimizer's default)."""
    return DTYPES[knobs["newton_schulz"]] if "newton_schulz" in knobs else None


def tune(trainer: Any, cfg: TrainConfig, kept: dict[str, Any] | None = None
         ) -> autotune.Choice:
    """Choose and return the knobs for `trainer` (built model, not yet moved or wrapped).

    A resumed run keeps the choice its run.json records (`kept`) while that is still one of
    the candidates, so it goes on with the same kernels however few iterations remain.
    Otherwise measures only on one CPU process with a run long enough for it to pay; else (or
    with everything set explicitly) the reference, or the explicit setting, unmeasured.
    """
    found = candidates(cfg, trainer.model.config.padded_vocab_size)
    name = (kept or {}).get("choice")
    if name in found and found[name] == kept.get("knobs"):
        return autotune.Choice(name, found[name], f"{name}: kept from the run resumed",
                               float(kept.get("speedup", 1.0)), cached=True)
    planned = cfg.max_iters - trainer.progress.iter_num
    # (a compiled model runs other kernels than the eager copies measured here)
    if trainer.device.type != "cpu" or trainer.info.enabled or cfg.eval_only \
            or cfg.compile is True:
        return autotune.unmeasured(found)
    model = trainer.model
    shape = {**model.config.to_dict(), "dropout": cfg.dropout}
    batch = {"batch_size": cfg.batch_size, "block_size": model.config.block_size,
             "grad_clip": cfg.grad_clip > 0}
    key = autotune.cache_key(shape, batch, trainer.device.type, found)
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def timer(name: str) -> autotune.TimeSteps:
        if not batches:  # read only when measuring
            tokens = open_tokens(trainer.dataset_dir, "train", trainer.meta)
            loader = Loader(tokens, cfg.batch_size, model.config.block_size, cfg.seed,
                            trainer.device, "train")
            batches.extend(loader.next_batch() for _ in range(BATCHES))
        return step_timer(model, found[name], cfg, trainer.device, batches)

    long_enough = planned * autotune.RUN_FRACTION >= STEPS_PER_CANDIDATE * len(found)
    with torch.random.fork_rng(devices=[]):  # the run's RNG is as if tuning never ran
        return autotune.choose(found, timer, key, planned, may_measure=long_enough)


def step_timer(model: GPT, knobs: dict[str, Any], cfg: TrainConfig, device: torch.device,
               batches: list[tuple[torch.Tensor, torch.Tensor]]) -> autotune.TimeSteps:
    """Time full training steps (forward, backward, clip, AdamW) of a copy of `model`."""
    model = build_with(model, knobs, copy=True)  # same initial weights for every candidate
    model.to(device).train()
    optimizer = configure_optimizer(model, cfg, device.type, ns_dtype(knobs))
    dtype = DTYPES[knobs["dtype"]]
    done = 0

    def time_steps(n: int) -> autotune.Measurement:
        nonlocal done
        seconds, loss = [], torch.zeros(())
        for _ in range(n):
            x, y = batches[done % len(batches)]
            torch.manual_seed(cfg.seed + done)  # the same dropout draws for every candidate
            t0 = time.perf_counter()
            with autocast(device, dtype):
                loss = model(x, y)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - t0)
            done += 1
        return autotune.Measurement(seconds, loss.item())
    return time_steps
