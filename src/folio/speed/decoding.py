"""The measured choice of how to decode on a CPU: float32 or bfloat16 (with dtype=auto), and
weights packed for oneDNN or not (packed.py).

Each candidate decodes the same fixed tokens one at a time with a KV cache; the fastest whose
loss on those tokens stays within tolerance of float32's wins (machine/autotune.py's rules and
cache, keyed by CPU, torch, model shape and candidates). Explicit settings are never measured:
dtype=float32 keeps float32 and only packing is measured.

torch.compile is not a candidate: on a Zen 5 its decoding step of the 6 x 384 char model took
7.3 ms (5.6 with frozen weights) against eager's 3.7, after 20-30 s of compiling.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F

from folio.config import AUTO
from folio.machine.device import DTYPES, cpu_supports_bf16, dtype_name
from folio.model.gpt import GPT
from folio.speed import autotune
from folio.speed.packed import can_pack, decoding_copy

BUDGET_S = 1.0  # the first sample on a machine waits at most this long for the measurement
RUN_FRACTION = 0.1  # ...or this share of the planned tokens' decoding, if less
MAX_MEASURED_PARAMS = 400_000_000  # larger models are not copied to compare (memory)


def candidates(model: GPT, dtype_setting: str) -> dict[str, dict[str, Any]]:
    """{name: knobs} to compare; the first (the model as loaded) is the reference."""
    loaded = dtype_name(model.transformer.wte.weight.dtype)
    dtypes = [loaded]
    if dtype_setting == AUTO and loaded == "float32" and cpu_supports_bf16():
        dtypes.append("bfloat16")
    packable = can_pack(model)
    found = {}
    for dtype in dtypes:
        found[dtype] = {"dtype": dtype, "packed": False}
        if packable:
            found[f"{dtype} + packed"] = {"dtype": dtype, "packed": True}
    return found


def build(model: GPT, knobs: dict[str, Any]) -> GPT:
    """A decoding copy (packed.py) of `model` or of a twin in knobs' dtype, its linear
    layers packed or not."""
    dtype = DTYPES[knobs["dtype"]]
    if model.transformer.wte.weight.dtype != dtype:  # a twin sharing nothing once converted
        model = copy.deepcopy(model).to(dtype).eval()
    return decoding_copy(model, knobs["packed"])


def for_decoding(model: GPT, dtype_setting: str, planned_tokens: int
                 ) -> tuple[GPT, autotune.Choice]:
    """The fastest way found to decode with `model` (eval mode, as loaded, not compiled) and
    the choice; on other devices, `model` itself."""
    found = candidates(model, dtype_setting)
    device = model.transformer.wte.weight.device
    if device.type != "cpu" or model.num_params() > MAX_MEASURED_PARAMS \
            or model.config.block_size < 2:
        return model, autotune.unmeasured(found)
    key = autotune.cache_key(model.config.to_dict(), {"decode": 1}, device.type, found)
    choice = autotune.choose(found, lambda name: decode_timer(build(model, found[name])), key,
                             planned_tokens, budget_s=BUDGET_S,
                             run_fraction=RUN_FRACTION)
    return build(model, choice.knobs), choice


def decode_timer(model: GPT) -> autotune.TimeSteps:
    """Time one-token cached forward passes over fixed tokens (a prefill of half the window
    first, untimed); the loss is their mean cross-entropy against the next fixed token."""
    cfg = model.config
    tokens = torch.randint(cfg.vocab_size, (1, cfg.block_size + 1),
                           generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()

    @torch.no_grad()
    def time_steps(n: int) -> autotune.Measurement:
        seconds, losses = [], []
        for _ in range(n):
            if cache.length in (0, cfg.block_size):  # start (again) from half a window
                cache.reset()
                model(tokens[:, :cfg.block_size // 2], cache=cache)
            at = cache.length
            t0 = time.perf_counter()
            logits = model(tokens[:, at:at + 1], cache=cache)  # (1, V)
            seconds.append(time.perf_counter() - t0)
            losses.append(F.cross_entropy(logits.float(), tokens[:, at + 1]).item())
        return autotune.Measurement(seconds, sum(losses) / len(losses))
    return time_steps
