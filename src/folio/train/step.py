"""One optimizer step: forward and backward over the micro-batches, clip, update, zero the
gradients. The training loop runs it, and the speed measurement (speed/training.py) times it
on candidate copies of the model, so what is measured is what trains."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from folio.machine import distributed
from folio.machine.device import autocast

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs and targets, each (B, T)


@dataclass
class TrainStep:
    model: torch.nn.Module  # what runs forward: the plain model, or it wrapped (DDP, compile)
    plain: torch.nn.Module  # the plain model, whose gradients are clipped
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype  # autocast dtype (float32: none)
    grad_clip: float  # max gradient norm; 0 leaves gradients as they are
    scaler: torch.amp.GradScaler  # float16 loss scaling; disabled otherwise
    doc_start: int | None = None  # (chat) the token opening each packed conversation: the
    # model attends within a conversation only (GPT.forward); None: plain language modelling

    def __call__(self, next_batch: Callable[[], Batch], micro_batches: int = 1) -> torch.Tensor:
        """One step over `micro_batches` batches from next_batch(); their mean loss (no sync)."""
        total = torch.zeros((), device=self.device)
        for micro in range(micro_batches):
            x, y = next_batch()
            last = micro == micro_batches - 1
            with distributed.no_sync(self.model, sync=last), autocast(self.device, self.dtype):
                loss = self.model(x, y, doc_start=self.doc_start) / micro_batches  # mean of all
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.plain.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total
