"""torchrun integration: the only module that touches torch.distributed.

Reads torchrun's environment, starts and tears down the process group (nccl on CUDA, gloo on
the CPU), wraps the model (DDP, or FSDP2 shards), and gathers sharded state for rank 0's saves.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from folio.errors import ConfigError, TrainingError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    # CPU (gloo) process group for small control messages (stop flags, losses, RNG states),
    # so agreeing on them never waits for the GPU. Set by `init`.
    control: Any = field(default=None, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """This process's place in a torchrun launch (a single process when not launched so)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    return DistInfo(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=int(os.environ["WORLD_SIZE"]),
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def device_for_rank(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank on a multi-GPU machine gets its own GPU."""
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def init(info: DistInfo, device: torch.device, backend: str) -> DistInfo:
    """Join the process group torchrun set up; returns `info` with its control group."""
    if not info.enabled:
        return info
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("backend=nccl needs CUDA devices; use --backend=gloo on the CPU")
    dist.init_process_group(backend=backend,
                            device_id=device if device.type == "cuda" else None)
    control = None if backend == "gloo" else dist.new_group(backend="gloo")
    return replace(info, control=control)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def session(info: DistInfo, device: torch.device, backend: str) -> Iterator[DistInfo]:
    """The process group for one run, destroyed however the run ends.

    When another process dies (an error, a second Ctrl+C), this one's next collective fails:
    that becomes a one-line TrainingError instead of a backend traceback.
    """
    info = init(info, device, backend)
    try:
        yield info
        if info.enabled:  # leave together: a rank that tears down while a peer still talks
            dist.barrier()  # to it could abort in gloo's threads ("terminate called ...")
    except RuntimeError as e:
        lost = isinstance(e, dist.DistError) or any(s in str(e) for s in _PEER_LOST)
        if not (info.enabled and lost):
            raise
        raise TrainingError(f"process {info.rank} lost contact with the other processes; "
                            "another process probably failed: see its message above"
                            ) from None
    finally:
        shutdown()


# gloo reports a dead peer as a plain RuntimeError carrying one of these
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


# ------------------------------------------------------------------------------ the model

def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device, dtype: torch.dtype,
         compile: bool = False, fsdp: bool = False) -> torch.nn.Module:
    """The module to train: `model` compiled and/or wrapped in DDP, or sharded with FSDP2.

    FSDP shards `model` in place (its parameters become DTensors), so checkpoints must go
    through `full_state_dict` / `full_optimizer_state`. A single process gets no wrapper.
    """
    if fsdp and info.enabled:
        if dtype == torch.float16:
            raise ConfigError("fsdp=True does not support dtype=float16 (no sharded gradient "
                              "scaler); use --dtype=bfloat16 or --dtype=float32")
        shard(model, info, device)
        return torch.compile(model) if compile else model
    body = torch.compile(model) if compile else model
    if not info.enabled:
        return body
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(body, device_ids=ids)


def shard(model: torch.nn.Module, info: DistInfo, device: torch.device) -> None:
    """FSDP2: one unit per transformer block, then the root.

    The root unit holds the embeddings, final norm and head, so the tied wte/lm_head
    parameter lives in exactly one unit.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (info.world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-step of an accumulation.

    FSDP reduce-scatters every micro-step instead: that keeps gradients sharded, which is
    the point of FSDP (skipping would hold a full unsharded gradient on every rank).
    """
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def all_finite(model: torch.nn.Module, info: DistInfo) -> bool:
    """True if every rank's parameters (or shards of them) are finite; all ranks must call."""
    local_ok = all(bool(torch.isfinite(_local(p)).all()) for p in model.parameters())
    return not broadcast_flag(not local_ok, info)


# ------------------------------------------------------------------------------ checkpoints

def full_state_dict(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The model's complete state dict, for rank 0 to save.

    Unsharded models return their own state dict. FSDP shards are gathered one tensor at a
    time (every rank must call this) and kept, on the CPU, on rank 0 only.
    """
    state = model.state_dict(keep_vars=True)  # keep_vars: tied parameters stay one object
    if not any(_is_dtensor(v) for v in state.values()):
        return {k: v.detach() for k, v in state.items()}
    full: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor | None] = {}  # by parameter identity: gather tied ones once
    for name, value in state.items():
        if id(value) not in done:
            tensor = _full_cpu(value.detach())
            done[id(value)] = tensor if info.is_master else None
        if info.is_master:
            full[name] = done[id(value)]
    return full


def full_optimizer_state(optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """The optimizer's state_dict with FSDP-sharded tensors gathered (every rank must call)."""
    state = optimizer.state_dict()
    if not any(_is_dtensor(v) for entry in state["state"].values() for v in entry.values()):
        return state
    full = {}
    for idx in sorted(state["state"]):
        entry = {k: _full_cpu(v) for k, v in state["state"][idx].items()}
        if info.is_master:
            full[idx] = entry
    return {"state": full, "param_groups": state["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full (unsharded) optimizer state_dict, sharding it like the parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(_is_dtensor(p) for p in params):
        state = {"state": {idx: {k: _shard_like(v, params[int(idx)]) for k, v in entry.items()}
                           for idx, entry in state["state"].items()},
                 "param_groups": state["param_groups"]}
    optimizer.load_state_dict(state)


def gather_rank_states(state: dict[str, torch.Tensor], info: DistInfo
                       ) -> dict[str, torch.Tensor]:
    """Every rank's small CPU state tensors (RNG, loader) collected on rank 0.

    Rank 0's keep their names (so a single process reads them as its own); rank r's are
    stored as "rank{r}.<name>". Every rank must call this with the same keys.
    """
    if not info.enabled:
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        tensor = state[name].contiguous()
        parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
        dist.gather(tensor, parts if info.is_master else None, dst=0, group=info.control)
        out[name] = tensor
        out.update({f"rank{r}.{name}": parts[r] for r in range(1, info.world_size)})
    return out if info.is_master else {}


def rank_state(saved: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """This rank's part of what `gather_rank_states` saved."""
    if info.rank == 0:
        return {k: v for k, v in saved.items() if not _RANK_KEY.match(k)}
    prefix = f"rank{info.rank}."
    return {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}


_RANK_KEY = re.compile(r"rank\d+\.")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard, gathered from every rank (every rank must call);
    a plain tensor as it is."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor that every rank holds alike, sharded like `param` (itself if not FSDP)."""
    return _shard_like(value, param)


def _is_dtensor(value: Any) -> bool:
    """Whether `value` is an FSDP shard (a DTensor), without importing DTensor (~2 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _full_cpu(value: Any) -> Any:
    if _is_dtensor(value):
        value = value.full_tensor()
    return value.to("cpu") if torch.is_tensor(value) else value


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _shard_like(value: Any, param: torch.Tensor) -> Any:
    """A full optimizer tensor (e.g. exp_avg) as a DTensor sharded like its parameter."""
    if not (_is_dtensor(param) and torch.is_tensor(value) and value.shape == param.shape):
        return value  # scalars such as `step` are not sharded
    from torch.distributed.tensor import distribute_tensor
    local = value.to(device=_local(param).device, dtype=param.dtype)
    return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)


# ------------------------------------------------------------------------------ control

def all_reduce_mean(value: float, info: DistInfo) -> float:
    """The mean of `value` over all ranks (the same result on every rank)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=info.control)
    return t.item() / info.world_size


def all_reduce_sums(values: list[float], info: DistInfo) -> list[float]:
    """Each of `values` summed over all ranks, in one collective (the same on every rank)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=info.control)
    return t.tolist()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any (e.g. one rank got Ctrl+C)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control)
    return bool(t.item())


def all_reduce_max(values: list[float], info: DistInfo) -> list[float]:
    """The largest of each value over the ranks, the same on every rank (a budgeted run's
    clock and its decision to stop)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier(group=info.control)
