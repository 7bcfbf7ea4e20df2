"""GPT weights as named tensors: what a run dir stores, and the one loader that builds a GPT.

Every source (a folio run dir, a nanoGPT ckpt.pt, a Hugging Face GPT-2) ends in
`gpt_from_state`, with nanoGPT's tensor names (which folio's model shares).
"""

from __future__ import annotations

from pathlib import Path

import torch

from folio.errors import CheckpointError
from folio.model.gpt import GPT, GPTConfig
from folio.speed.noinit import no_init

TIED_KEY = "lm_head.weight"  # the same tensor as WTE_KEY; stored once
WTE_KEY = "transformer.wte.weight"
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks of nanoGPT / old transformers


def model_state(model: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's (or state dict's) tensors, a tied head dropped (an untied one is its own
    weights and kept), contiguous on the CPU."""
    state = model if isinstance(model, dict) else model.state_dict()
    tied = TIED_KEY in state and WTE_KEY in state and _same(state[TIED_KEY], state[WTE_KEY])
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()
            if not (tied and k == TIED_KEY)}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a tied head and embedding are one tensor (or, gathered apart, equal)."""
    if a.device.type != "meta" and a.data_ptr() == b.data_ptr():
        return True
    return a.shape == b.shape and bool(torch.equal(a, b))


def pad_rows(tensor: torch.Tensor, rows: int, source: str | Path) -> torch.Tensor:
    """Zero-pad dim 0 of tensor (V, ...) to `rows`."""
    if tensor.shape[0] > rows:
        raise CheckpointError(f"{source}: embedding has {tensor.shape[0]} rows, more than the "
                              f"{rows} its vocab_size allows")
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad]) if len(pad) else tensor


def gpt_from_state(config: GPTConfig, state: dict[str, torch.Tensor],
                   source: str | Path) -> GPT:
    """A GPT of `config` holding `state`; the embedding is zero-padded to the table size.

    The model is built on the meta device and the tensors are assigned, so a large model is
    never randomly initialised only to be overwritten. A tensor that is missing, extra or
    mis-shaped for `config` is a one-line error naming `source`.
    """
    state = {k: v for k, v in state.items()
             if not k.endswith(BUFFERS) and (k != TIED_KEY or not config.tie_head)}
    if WTE_KEY not in state:
        raise CheckpointError(f"{source} has no {WTE_KEY}; it is not a GPT-2/nanoGPT model")
    for key in (WTE_KEY, TIED_KEY):
        if key in state:
            state[key] = pad_rows(state[key], config.padded_vocab_size, source)
    with torch.device("meta"), no_init():  # no init kernels (and no torch._dynamo import)
        model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items()
                if k != TIED_KEY or not config.tie_head}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k]]
    for problem, keys in (("is missing", missing), ("has unexpected", unexpected),
                          ("has a mis-shaped", wrong)):
        if keys:
            raise CheckpointError(f"{source} {problem} tensor {keys[0]} ({len(keys)} in all) "
                                  "for the model its config describes; the weights do not "
                                  "match their config")
    state = {k: v.float().contiguous() for k, v in state.items()}
    if config.tie_head:
        state[TIED_KEY] = state[WTE_KEY]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_head:
        model.transformer.wte.weight = model.lm_head.weight  # assign=True unties; tie again
    return model
