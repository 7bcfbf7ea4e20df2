"""Optimizers (AdamW with nanoGPT's parameter groups, or Muon + AdamW) and the learning-rate
schedules as pure functions of the step."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from folio.config import TrainConfig
from folio.machine.distributed import full_tensor, shard_like

MUON_MOMENTUM_START = 0.85  # Muon's momentum warms up from here to muon_momentum


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str,
                        ns_dtype: torch.dtype | None = None):
    """The optimizer `cfg.optimizer` names: AdamW for everything (nanoGPT), or Muon for the
    transformer blocks' 2-D weight matrices and AdamW for the rest (muon); `ns_dtype` is
    Muon's Newton-Schulz dtype (default: bfloat16 on CUDA, else float32)."""
    if cfg.optimizer == "muon":
        return muon_adamw(model, cfg, device_type, ns_dtype)
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, cfg, device_type)


def adamw(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused_ok and device_type in ("cuda", "cpu", "mps") else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **extra)


def muon_params(model: torch.nn.Module) -> tuple[list[torch.Tensor], dict[str, list]]:
    """(Muon's parameters, AdamW's by kind): Muon takes the blocks' 2-D weight matrices;
    embeddings, the head, norms, biases and other scalars go to AdamW."""
    muon: list[torch.Tensor] = []
    rest: dict[str, list] = {"embed": [], "head": [], "scalar": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if ".h." in f".{name}" and p.dim() == 2:
            muon.append(p)
        elif name.startswith("lm_head"):
            rest["head"].append(p)
        elif p.dim() >= 2:
            rest["embed"].append(p)
        else:
            rest["scalar"].append(p)
    return muon, rest


def muon_adamw(model: torch.nn.Module, cfg: TrainConfig, device_type: str,
               ns_dtype: torch.dtype | None = None) -> MuonAdamW:
    """Muon at muon_lr for block matrices; AdamW at embed_lr / head_lr / learning_rate for
    embeddings / head / the rest. Every group's `lr_scale` is its peak over learning_rate,
    so one schedule drives all of them (`apply_schedule`)."""
    matrices, rest = muon_params(model)
    base = cfg.learning_rate
    peak = {"embed": cfg.embed_lr or base, "head": cfg.head_lr or base, "scalar": base}
    groups = [{"params": ps, "lr_scale": peak[kind] / base,
               "weight_decay": cfg.weight_decay if kind != "scalar" else 0.0}
              for kind, ps in rest.items() if ps]
    muon = BatchedMuon([{"params": matrices, "lr_scale": cfg.muon_lr / base, "muon": True}],
                       lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                       ns_dtype=ns_dtype)
    return MuonAdamW(muon, adamw(groups, cfg, device_type))


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon's update, settings and state, with Newton-Schulz run once per matrix
    shape on a stack of the same-shape matrices, in `ns_dtype` (default: bfloat16 on CUDA,
    float32 elsewhere; on a CPU with bfloat16 matmul units training measures which is faster,
    speed/training.py).

    Why not torch's own step: it orthogonalises one matrix at a time in bfloat16, which on a
    CPU without bfloat16 matmul units cost 175 ms per step for the 16 block matrices of the
    README CPU model, against 28 ms here (91 ms unbatched float32; one AMD EPYC, AVX512). On a
    Zen 5 with AVX-512 BF16 the batched bfloat16 iteration takes 8 ms against float32's 20.
    Under FSDP each matrix's update is gathered whole, orthogonalised alike on every rank and
    applied to the local shard (Newton-Schulz needs the whole matrix).
    """

    def __init__(self, params: Any, ns_dtype: torch.dtype | None = None, **settings: Any
                 ) -> None:
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            momentum = group["momentum"]
            updates = []
            for grad, buf in zip(grads, bufs, strict=True):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                updates.append(full_tensor(update))  # (r, c) whole, also under FSDP
            by_shape: dict[tuple, list[int]] = {}
            for i, u in enumerate(updates):  # wide orientation: (r, c) and (c, r) batch together
                by_shape.setdefault(tuple(sorted(u.shape)), []).append(i)
            for members in by_shape.values():
                stack = torch.stack([wide(updates[i]) for i in members])  # (n, r, c), r <= c
                ortho = newton_schulz(stack, group["ns_coefficients"], group["ns_steps"],
                                      group["eps"], self.ns_dtype)
                for i, o in zip(members, ortho, strict=True):
                    p = params[i]
                    o = o if p.size(0) <= p.size(1) else o.T
                    lr = group["lr"] * math.sqrt(max(1.0, p.size(0) / p.size(1)))  # "original"
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(shard_like(o.to(p.dtype).contiguous(), p), alpha=-lr)


def wide(m: torch.Tensor) -> torch.Tensor:
    """m (r, c) with r <= c (transposed if taller than wide)."""
    return m if m.size(0) <= m.size(1) else m.T


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate orthogonalisation of each matrix of g (n, r, c), r <= c, by torch.optim.Muon's
    quintic Newton-Schulz iteration, in `dtype` (default: bfloat16 on CUDA, else float32)."""
    a, b, c = coefficients
    x = g.to(dtype or (torch.bfloat16 if g.is_cuda else torch.float32))
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (n, r, r)
        x = a * x + torch.baddbmm(gram, gram, gram, beta=b, alpha=c) @ x
    return x


class MuonAdamW:
    """Two optimizers stepped, zeroed, saved and loaded as one.

    `param_groups` lists Muon's groups, then AdamW's (the same dicts, so setting a group's lr
    sets it in the optimizer that owns it). The state_dict is one torch-style state_dict whose
    parameter indices run through Muon's parameters, then AdamW's, so a run dir stores it like
    AdamW's and a resume is exact.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    @property
    def defaults(self) -> dict:
        return self.adamw.defaults

    def step(self, closure: Any = None) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def _n_muon(self) -> int:
        return sum(len(g["params"]) for g in self.muon.param_groups)

    def state_dict(self) -> dict:
        m, a = self.muon.state_dict(), self.adamw.state_dict()
        n = self._n_muon()
        state = {**m["state"], **{i + n: s for i, s in a["state"].items()}}
        groups = m["param_groups"] + [{**g, "params": [i + n for i in g["params"]]}
                                      for g in a["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        n, k = self._n_muon(), len(self.muon.param_groups)
        groups = state["param_groups"]
        entries = {int(i): s for i, s in state["state"].items()}
        self.muon.load_state_dict({
            "state": {i: s for i, s in entries.items() if i < n}, "param_groups": groups[:k]})
        self.adamw.load_state_dict({
            "state": {i - n: s for i, s in entries.items() if i >= n},
            "param_groups": [{**g, "params": [i - n for i in g["params"]]}
                             for g in groups[k:]]})


def apply_schedule(optimizer: Any, step: int, cfg: TrainConfig, progress: float | None = None
                   ) -> float:
    """Set every group's learning rate (its `lr_scale` times the schedule's) and Muon's
    momentum for `step` (and, in a budgeted run, `progress`: the fraction of the training time
    spent); returns the schedule's learning rate."""
    lr = lr_at(step, cfg, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("muon"):
            group["momentum"] = muon_momentum_at(step, cfg, progress)
    return lr


MOMENTUM_WARMUP_SHARE = 0.3  # a budgeted run's Muon momentum is warm by this share of its time


def muon_momentum_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup from MUON_MOMENTUM_START to muon_momentum over muon_momentum_warmup
    iterations (a budgeted run: or over MOMENTUM_WARMUP_SHARE of its time, if sooner)."""
    frac = min(1.0, step / cfg.muon_momentum_warmup) if cfg.muon_momentum_warmup else 1.0
    if progress is not None:
        frac = max(frac, min(1.0, progress / MOMENTUM_WARMUP_SHARE))
    return MUON_MOMENTUM_START + frac * (cfg.muon_momentum - MUON_MOMENTUM_START)


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup to learning_rate, then (lr_schedule) a cosine decay to min_lr at
    lr_decay_iters (default: max_iters) and flat after; or (wsd) constant, then a linear
    warmdown to min_lr over the last warmdown_frac of lr_decay_iters.

    A budgeted run gives `progress`, the fraction of its training time spent: the decay then
    follows it (and the iterations, when max_iters ends the run sooner), so it ends at the
    deadline; the warmup stays in iterations."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if progress is not None:
        return _decayed(cfg, _budget_fraction(step, cfg, progress))
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step > decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        start = max(cfg.warmup_iters, decay_iters * (1.0 - cfg.warmdown_frac))
        coeff = 1.0 - max(0.0, step - start) / max(1.0, decay_iters - start)  # 1 -> 0
    else:
        ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def _budget_fraction(step: int, cfg: TrainConfig, progress: float) -> float:
    """How far a budgeted run is through its schedule: its time, or its iterations when a
    max_iters (or lr_decay_iters) would end it sooner."""
    limit = cfg.lr_decay_iters or cfg.max_iters
    return min(1.0, max(progress, step / limit if limit else 0.0))


def _decayed(cfg: TrainConfig, frac: float) -> float:
    """The schedule's learning rate after the warmup, at fraction `frac` of the run."""
    if cfg.lr_schedule == "wsd":
        start = 1.0 - cfg.warmdown_frac
        coeff = 1.0 - max(0.0, frac - start) / max(1e-9, 1.0 - start)  # 1 -> 0
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * frac))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
