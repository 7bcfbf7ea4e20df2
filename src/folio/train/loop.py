"""The training loop, readable top to bottom: set up, then evaluate / step / log until done.

Semantics follow nanoGPT's train.py (same settings, same schedule, same checkpoints) with
finite defaults, atomic safetensors checkpoints, exact resume and a clean Ctrl+C.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from folio.config import AUTO, TrainConfig, parse_duration
from folio.data.loader import check_split_length, make_loader, open_split
from folio.data.tokenizer import read_meta
from folio.errors import CheckpointError, DataError, TrainingError
from folio.machine import distributed
from folio.machine.device import (
    DTYPES,
    autocast,
    configure_allocator,
    configure_threads,
    dtype_name,
    flush_denormals,
    peak_flops,
    resolve_device,
    resolve_dtype,
)
from folio.model.gpt import GPT, GPTConfig
from folio.speed import autotune
from folio.speed import kernels as speed_kernels
from folio.speed import training as training_choice
from folio.speed.kernels import Kernels
from folio.store import checkpoint, guard, rundir, sources
from folio.store.checkpoint import ResumeState
from folio.store.rundir import RunInfo
from folio.store.weights import gpt_from_state, model_state
from folio.train.budget import Budget, card_seconds
from folio.train.evaluate import (
    CPU_EVAL_TOKENS,
    all_reduce_scores,
    estimate_loss,
    token_byte_lengths,
)
from folio.train.optim import apply_schedule, configure_optimizer
from folio.train.recipes import MODEL_SHAPE_KEYS, head_tied
from folio.train.step import Batch, TrainStep
from folio.watch.metrics import finite_or_none, format_duration


def train(cfg: TrainConfig, note: str = "", started: float | None = None) -> int:
    """Train what the final settings `cfg` say (train.recipes.resolve made them from what the
    user gave; `note` says what it filled in, the first line printed); returns the process
    exit code (130 after Ctrl+C). `started`: when the process started, by time.monotonic (a
    --time budget counts from then)."""
    info = distributed.from_env()
    device = distributed.device_for_rank(info, resolve_device(cfg.device))
    if device.type == "cpu":
        configure_allocator()
        flush_denormals()
    if note and info.is_master:
        print(f"folio: {note}", flush=True)
    # Before anything touches out_dir: one trainer per run dir (rank 0 holds the lock), and a
    # fresh run never replaces saved weights unless told to.
    claim = (guard.claim(cfg.out_dir, fresh=cfg.init_from != "resume", overwrite=cfg.overwrite)
             if info.is_master else contextlib.nullcontext())
    with claim as lock, distributed.session(info, device, cfg.backend) as info:
        trainer = Trainer(cfg, info, device, started=started)
        if info.is_master:
            lock.record_holder()  # only now: a failed start leaves the lock file as it was
        return trainer.run()


BUDGET_EVALS = 10  # a budgeted run with eval_interval 0 evaluates each tenth of its time
EVAL_SHARE = 0.05  # ...on at most eval_iters batches, fewer where they would cost more than
MIN_EVAL_ITERS = 4  # this share of the budget (but never fewer than these)


class StopRequest(AbstractContextManager):
    """First SIGINT/SIGTERM asks the loop to save and stop; a second one exits at once."""

    REPEAT_S = 1.0  # torchrun re-sends the Ctrl+C its workers already got: one request

    def __init__(self) -> None:
        self.requested = False
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and time.monotonic() - self._first < self.REPEAT_S:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self._first = True, time.monotonic()
        print(f"\nfolio: got {signal.Signals(signum).name}; saving a checkpoint after this step "
              "(press Ctrl+C again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Progress:
    iter_num: int = 0
    best_val_loss: float = float("inf")
    best_val_bpb: float | None = None  # val bits per byte at best_iter
    best_iter: int = -1
    evaluated_at: int = -1  # iteration whose eval already ran (skip it again after resume)


@dataclass
class Resumed:
    """What a resumed run starts from: the saved state, the model it describes, and the fast
    path its run.json records (kept while it is still a candidate)."""

    state: ResumeState
    model_config: GPTConfig
    tuning: dict[str, Any] | None


class Trainer:
    """Holds the objects of one training run, built from explicit parts; `run()` is the loop.

    Set-up: the dataset, the resume state, the plain model (`build_model`), its fast path
    measured and applied (`choose_kernels`), the data loader, the wrapped model, the optimizer
    and the one step function, then the restored state. `kernels` given: used as they are,
    nothing measured (`folio bench`'s fixed paths).
    """

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo, device: torch.device,
                 kernels: Kernels | None = None, started: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg, self.info, self.device = cfg, info, device
        self.clock = clock  # a budget's clock (tests inject one)
        self.started = clock() if started is None else started  # run.json's wall_s counts from it
        self.budget = (Budget(parse_duration(cfg.time), clock=clock, started=started)
                       if cfg.time else None)
        if self.budget is not None and cfg.report:  # the card is written within the budget
            self.budget.after_s = card_seconds(self.budget.seconds)
        self.master = info.is_master
        configure_threads(info.local_world_size if device.type == "cpu" else 1)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if cfg.gradient_accumulation_steps % info.world_size:
            raise TrainingError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} "
                                f"is not divisible by the {info.world_size} processes; make it "
                                "a multiple of the process count")
        self.grad_accum = cfg.gradient_accumulation_steps // info.world_size
        self.out_dir = Path(cfg.out_dir)
        self.dataset_dir = ensure_dataset(cfg, info)
        self.meta = read_meta(self.dataset_dir)
        check_task(cfg, self.meta)
        # (chat) packed conversations kept apart: attention within each, from position 0
        self.doc_start = self.meta["conversation_start_id"] if cfg.task == "chat" else None
        self.progress = Progress()
        self.evals_done = 0  # tenths of a budgeted run's time already evaluated
        self.eval_iters = cfg.eval_iters  # a budgeted run may take fewer (check_budget_fits)
        resumed = load_resume(cfg, self.out_dir, self.meta) if cfg.init_from == "resume" else None
        if resumed is not None and self.budget is not None:  # go on with the time left
            self.budget.spent_before = resumed.state.time_spent
        self.model = model = build_model(cfg, self.meta, resumed, self.master)
        block_size = model.config.block_size  # the model decides its shape
        splits = {s: open_split(self.dataset_dir, s, self.meta) for s in ("train", "val")}
        self.eval_splits = splits
        self.token_bytes = self._token_bytes()
        self.loader = make_loader(splits["train"], cfg.batch_size, block_size,
                                  cfg.seed + info.rank, device, "train")
        check_split_length(splits["val"], block_size, "val")  # fail now, not at the eval
        make_loader(splits["val"], 1, block_size, 0, device, "val")  # (chat) a val window
        if self.loader.truncated and self.master:
            print(f"folio: {self.loader.truncated:,} training conversation(s) are longer than "
                  f"block_size+1={block_size + 1} tokens: each is trained on its first "
                  f"{block_size + 1} tokens only", flush=True)

        self.dtype = resolve_dtype(cfg.dtype, device, training=True)
        self.tuning: autotune.Choice | None = None
        knobs: dict[str, Any] = {}
        if kernels is None:
            kernels = Kernels.for_device(device.type)
            if device.type == "cpu":  # knobs on auto: measured on this model
                self.tuning = self.choose_kernels(resumed)
                knobs = self.tuning.knobs
                kernels = training_choice.cpu_kernels(knobs)
                self.dtype = DTYPES[knobs["dtype"]]
        self.kernels = kernels
        speed_kernels.apply(model, kernels)
        torch.manual_seed(cfg.seed + info.rank)  # each rank its own dropout

        model.to(device)
        self.compiled = should_compile(cfg, device)
        # stack small eval batches on a CPU when the fused loss keeps memory flat; on a GPU the
        # full logits of a bigger batch would cost memory, and a compiled model a recompile
        stack = device.type == "cpu" and kernels.fused_loss and not self.compiled
        self.eval_tokens = CPU_EVAL_TOKENS if stack else 0
        self.train_model = distributed.wrap(model, info, device, self.dtype,
                                            compile=self.compiled, fsdp=cfg.fsdp)
        self.optimizer = configure_optimizer(model, cfg, device.type,
                                             training_choice.ns_dtype(knobs))
        self.step_fn = TrainStep(self.train_model, model, self.optimizer, device, self.dtype,
                                 cfg.grad_clip, torch.amp.GradScaler(
                                     device.type, enabled=self.dtype == torch.float16),
                                 self.doc_start)
        if resumed is not None:
            self._restore(resumed.state)
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * block_size
        self.flops_per_iter = model.flops_per_token(block_size) * self.tokens_per_iter
        self.peak = peak_flops(device, self.dtype, cfg.peak_tflops) if self.master else 0.0
        if self.budget is not None:
            self.check_budget_fits()
        self.metrics = self._open_metrics(cfg, resumed and resumed.state)

    # ------------------------------------------------------------------ setup steps

    def choose_kernels(self, resumed: Resumed | None) -> autotune.Choice:
        """The CPU fast path for the plain model: kept from the run resumed, cached, measured
        on copies of it with the loop's own step function, or the reference unmeasured."""
        cfg, model = self.cfg, self.model
        vocab = model.config.padded_vocab_size
        found = training_choice.candidates(
            cfg.dtype, cfg.optimizer, 4 * cfg.batch_size * model.config.block_size * vocab)
        kept = training_choice.kept_choice(found, resumed and resumed.tuning)
        if kept is not None:
            return kept
        # (a compiled model runs other kernels than the eager copies measured here)
        if self.info.enabled or cfg.eval_only or cfg.compile is True:
            return autotune.unmeasured(found)
        shape = {**model.config.to_dict(), "dropout": cfg.dropout}
        batch = {"batch_size": cfg.batch_size, "block_size": model.config.block_size,
                 "grad_clip": cfg.grad_clip > 0}
        if self.doc_start is not None:  # attention under a mask: timed apart
            batch["documents"] = True
        key = autotune.cache_key(shape, batch, self.device.type, found)

        def batches() -> list[Batch]:
            return self.fixed_batches(training_choice.BATCHES)

        done = resumed.state.iter_num if resumed else 0
        planned = cfg.max_iters - done if cfg.max_iters is not None else None
        planned_s = self.budget.left() if self.budget else None
        return training_choice.choose(model, found, self.candidate_step, batches, key, planned,
                                      cfg.seed, planned_s)

    def candidate_step(self, twin: GPT, knobs: dict[str, Any]) -> training_choice.StepFn:
        """One training step of `twin`, a copy of the model, with the knobs' dtype and its own
        optimizer: the loop's step function, for measuring."""
        twin.to(self.device)
        optimizer = configure_optimizer(twin, self.cfg, self.device.type,
                                        training_choice.ns_dtype(knobs))
        step = TrainStep(twin, twin, optimizer, self.device, DTYPES[knobs["dtype"]],
                         self.cfg.grad_clip, torch.amp.GradScaler(self.device.type,
                                                                  enabled=False),
                         self.doc_start)
        return lambda x, y: step(lambda: (x, y))

    def fixed_batches(self, n: int) -> list[Batch]:
        """n training batches from a loader of their own (the run's loader is untouched)."""
        loader = make_loader(self.eval_splits["train"], self.cfg.batch_size,
                             self.model.config.block_size, self.cfg.seed, self.device, "train")
        return [loader.next_batch() for _ in range(n)]

    def _token_bytes(self) -> torch.Tensor | None:
        """Each token id's UTF-8 byte length, for bits per byte; None (loss only) when the
        dataset's tokenizer cannot be loaded here."""
        try:
            return token_byte_lengths(self.meta["tokenizer"], self.device)
        except DataError as e:
            if self.master:
                print(f"folio: warning: evaluations measure no bits per byte ({e})", flush=True)
            return None

    def _restore(self, resume: ResumeState) -> None:
        distributed.load_optimizer_state(self.optimizer, resume.optimizer)
        if resume.scaler:
            self.step_fn.scaler.load_state_dict(resume.scaler)
        rng = distributed.rank_state(resume.rng, self.info)
        loader = distributed.rank_state(resume.loader, self.info)
        # Each rank continues its own streams; with another process count (or from a nanoGPT
        # ckpt.pt, which stores none) every rank reseeds instead.
        if resume.world_size == self.info.world_size and loader:
            checkpoint.restore_rng(rng, self.device)
            self.loader.load_state_dict(loader)
        else:
            reseed = self.cfg.seed + self.info.rank + 1_000_003 * resume.iter_num
            torch.manual_seed(reseed)
            self.loader.generator.manual_seed(reseed)
        self.progress = Progress(iter_num=resume.iter_num, best_val_loss=resume.best_val_loss,
                                 best_val_bpb=resume.best_val_bpb, best_iter=resume.best_iter,
                                 evaluated_at=resume.evaluated_at)

    def _open_metrics(self, cfg: TrainConfig, resume: ResumeState | None):
        self.wandb_run_id = resume.wandb_run_id if resume else None
        if not self.master:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)  # train() claimed it; a bare Trainer not
        from folio.watch.metrics import MetricsLog
        wandb_cfg = {"project": cfg.wandb_project, "name": cfg.wandb_run_name,
                     "config": self.settings(), "id": self.wandb_run_id}
        log = MetricsLog(self.out_dir, wandb_cfg=wandb_cfg if cfg.wandb_log else None,
                         tensorboard=cfg.tensorboard, max_iters=cfg.max_iters)
        log.truncate_after(self.progress.iter_num if resume else -1)
        if log.wandb:  # a resumed run continues the same wandb run
            self.wandb_run_id = log.wandb.id
        return log

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        cfg, p = self.cfg, self.progress
        self.announce()
        self.write_info()
        started = time.perf_counter()
        with StopRequest() as stop:
            while True:
                if self.eval_due() and p.evaluated_at != p.iter_num:
                    self.evaluate_and_save(time.perf_counter() - started)
                if cfg.eval_only or self.finished():
                    break
                t0, tick = time.perf_counter(), self.clock()
                loss = self.step(p.iter_num)
                p.iter_num += 1
                if p.iter_num % cfg.log_interval == 0 or p.iter_num == cfg.max_iters:
                    # a host sync: only at log lines; the mean over every rank's micro-batches
                    loss_value = distributed.all_reduce_mean(loss.item(), self.info)
                    check_finite(loss_value, p.iter_num, "training loss")
                    ms = (time.perf_counter() - t0) * 1000
                    self.log_step(loss_value, self.lr, ms, time.perf_counter() - started)
                if self.budget is not None:
                    self.budget.record_step(self.clock() - tick)
                if distributed.broadcast_flag(stop.requested, self.info):
                    return self.save_on_interrupt()
        if self.budget is not None and p.evaluated_at != p.iter_num and not cfg.eval_only:
            self.evaluate_and_save(time.perf_counter() - started)  # the finished model
        self.save(best=False)
        if self.master:
            took = time.perf_counter() - started
            budget = ""
            if self.budget is not None:  # the whole run: set-up, evaluations and saves too
                took = self.budget.elapsed()
                budget = f" of a {format_duration(self.budget.seconds)} budget"
            bpb = f" ({p.best_val_bpb:.4f} bits per byte)" if p.best_val_bpb is not None else ""
            print(f"folio: done in {format_duration(took)}{budget}; best val loss "
                  f"{p.best_val_loss:.4f}{bpb} at iter {p.best_iter}. Sample with: folio "
                  f"sample --out_dir={self.out_dir}", flush=True)
            self.metrics.close()
        return 0

    def finished(self) -> bool:
        """max_iters reached, or (a budgeted run) no room for another step before the final
        evaluation and save; the same answer on every rank."""
        done = self.cfg.max_iters is not None and self.progress.iter_num >= self.cfg.max_iters
        if self.budget is not None:
            done = done or not self.budget.step_fits()
            done = bool(distributed.all_reduce_max([float(done)], self.info)[0])
        return done

    def eval_due(self) -> bool:
        """An evaluation at this iteration: every eval_interval iterations, or (eval_interval
        0, a budgeted run) at the start and each tenth of the budget."""
        p = self.progress
        if self.cfg.eval_interval:
            return p.iter_num % self.cfg.eval_interval == 0
        if p.evaluated_at < 0:
            return True
        tenths = math.floor(self.schedule_progress() * BUDGET_EVALS)
        return tenths > self.evals_done

    def schedule_progress(self) -> float:
        """A budgeted run's clock: the fraction of its training time spent, the same on
        every rank (the largest)."""
        return distributed.all_reduce_max([self.budget.progress()], self.info)[0]

    def step(self, iter_num: int) -> torch.Tensor:
        """Iteration iter_num's optimizer step over grad_accum micro-batches, at the schedule's
        learning rates (the base one kept in self.lr); returns their mean loss."""
        progress = self.schedule_progress() if self.budget is not None else None
        self.lr = apply_schedule(self.optimizer, iter_num, self.cfg, progress)
        return self.step_fn(self.loader.next_batch, self.grad_accum)

    def evaluate_and_save(self, time_s: float) -> None:
        cfg, p = self.cfg, self.progress
        tick = self.clock()
        scores = estimate_loss(self.train_model, self.eval_splits, self.eval_iters,
                               cfg.batch_size, self.model.config.block_size, self.device,
                               lambda: autocast(self.device, self.dtype),
                               seed_offset=self.info.rank, max_tokens=self.eval_tokens,
                               token_bytes=self.token_bytes, doc_start=self.doc_start)
        train, val = (all_reduce_scores(scores, self.info)[s] for s in ("train", "val"))
        if self.budget is not None:
            self.budget.record_eval(self.clock() - tick)
            self.evals_done = math.floor(self.schedule_progress() * BUDGET_EVALS)
        p.evaluated_at = p.iter_num
        check_finite(val.loss, p.iter_num, "validation loss")
        if self.master:
            self.metrics.log_eval(p.iter_num, p.iter_num * self.tokens_per_iter, time_s,
                                  train.loss, val.loss, train.bpb, val.bpb)
        improved = val.loss < p.best_val_loss
        if improved:
            p.best_val_loss, p.best_val_bpb, p.best_iter = val.loss, val.bpb, p.iter_num
        if (improved or cfg.always_save_checkpoint) and p.iter_num > 0 and not cfg.eval_only:
            self.save(best=True)

    def log_step(self, loss: float, lr: float, ms: float, time_s: float) -> None:
        if not self.master:
            return
        p = self.progress
        tokens_per_sec = self.tokens_per_iter / (ms / 1000)
        # per-device utilisation: each process does 1/world_size of the iteration's work
        mfu = (self.flops_per_iter / self.info.world_size / (ms / 1000) / self.peak
               if self.peak else 0.0)
        self.metrics.log_train(p.iter_num, p.iter_num * self.tokens_per_iter, time_s, loss, lr,
                               ms, tokens_per_sec, mfu)

    # ------------------------------------------------------------------ saving

    def save(self, best: bool) -> None:
        """Write resume state (and, if `best`, the sampling weights) atomically."""
        tick = self.clock()
        try:
            self._write_checkpoint(best)
        except (OSError, SafetensorError) as e:  # disk full, quota: previous files are intact
            reason = getattr(e, "strerror", None) or str(e).rsplit(": ", 1)[-1]
            raise CheckpointError(f"could not save a checkpoint in {self.out_dir} ({reason}); "
                                  "the previous checkpoint is kept. Free space or choose another "
                                  "--out_dir, then resume") from None
        if self.budget is not None:
            self.budget.record_save(self.clock() - tick)

    def _write_checkpoint(self, best: bool) -> None:
        p, info = self.progress, self.info
        # Every rank takes part in gathering (FSDP shards, per-rank streams); rank 0 writes.
        weights = distributed.full_state_dict(self.model, info)
        optimizer = distributed.full_optimizer_state(self.optimizer, info)
        rng = distributed.gather_rank_states(checkpoint.capture_rng(self.device), info)
        loader = distributed.gather_rank_states(self.loader.state_dict(), info)
        if not self.master:
            return
        if best:
            checkpoint.save_model_weights(self.out_dir / rundir.MODEL_FILE, weights,
                                          {"iter_num": p.iter_num,
                                           "val_loss": p.best_val_loss})
        state = ResumeState(
            iter_num=p.iter_num, best_val_loss=p.best_val_loss, best_val_bpb=p.best_val_bpb,
            model=model_state(weights), optimizer=optimizer, rng=rng, loader=loader,
            best_iter=p.best_iter, evaluated_at=p.evaluated_at, world_size=info.world_size,
            scaler=self.step_fn.scaler.state_dict(), dataset=self.cfg.dataset,
            wandb_run_id=self.wandb_run_id,
            time_spent=self.budget.elapsed() if self.budget is not None else 0.0)
        checkpoint.save_resume(self.out_dir, state)
        self.write_info()

    def save_on_interrupt(self) -> int:
        finite = distributed.all_finite(self.model, self.info)
        if finite:
            self.save(best=False)
        if self.master:
            if finite:
                print(f"folio: saved {self.out_dir} at iter {self.progress.iter_num}; continue "
                      f"with: folio train --init_from=resume --out_dir={self.out_dir} "
                      "(plus your other settings)", file=sys.stderr, flush=True)
            else:
                print("folio: weights are not finite; kept the last good checkpoint",
                      file=sys.stderr)
            self.metrics.close()
        return 130

    def write_info(self) -> None:
        if not self.master:
            return
        p = self.progress
        rundir.write_run_info(self.out_dir, RunInfo(
            model=self.model.config.to_dict(), n_params=self.model.num_params(),
            tokenizer=self.meta["tokenizer"], config=self.settings(), dataset=self.cfg.dataset,
            iter_num=p.iter_num, best_val_loss=finite_or_none(p.best_val_loss),
            best_val_bpb=finite_or_none(p.best_val_bpb), best_iter=p.best_iter, source="train",
            dtype=dtype_name(self.dtype), compile=self.compiled,
            world_size=self.info.world_size, tuning=self._tuning_record(),
            chat_template=self.meta.get("chat_template"),
            hardware=rundir.hardware(self.device), tokens_per_iter=self.tokens_per_iter,
            flops_per_token=self.flops_per_iter / self.tokens_per_iter,
            peak_flops=self.peak or None, wall_s=round(self.clock() - self.started, 3),
            **rundir.provenance(self.device)))

    def settings(self) -> dict[str, Any]:
        """The run's settings as recorded, with the model shape the model has (a resumed or
        pretrained model decides it, whatever the defaults say)."""
        shape = {k: getattr(self.model.config, k) for k in MODEL_SHAPE_KEYS}
        return {**dataclasses.asdict(self.cfg), **shape}

    def _tuning_record(self) -> dict[str, Any] | None:
        t = self.tuning
        return t and {"choice": t.name, "knobs": t.knobs, "speedup": round(t.speedup, 3),
                      "cached": t.cached, "ms_per_step": t.ms_per_step}

    def announce(self) -> None:
        if not self.master:
            return
        cfg, done = self.cfg, self.progress.iter_num
        dtype = dtype_name(self.dtype)
        if self.tuning:  # the measured choice and its ratio
            dtype = self.tuning.line
        if self.budget is None:
            guess = estimate_seconds(self.flops_per_iter * (cfg.max_iters - done), self.peak,
                                     self.device)
            plan = f"iters {done}->{cfg.max_iters} | {self.tokens_per_iter:,} tokens/iter | " \
                   f"est. {guess}"
        else:
            left = format_duration(self.budget.left())
            limit = (f"; or {cfg.max_iters} iters, whichever ends first"
                     if cfg.max_iters is not None else "")
            plan = (f"budget {format_duration(self.budget.seconds)}, {left} left{limit} | "
                    f"from iter {done} | {self.tokens_per_iter:,} tokens/iter")
        print(f"folio: training on {self.device} ({dtype}, compile "
              f"{'on' if self.compiled else 'off'}, {self.info.world_size} process"
              f"{'es' if self.info.enabled else ''}) | {plan} | out_dir {self.out_dir}",
              flush=True)

    def check_budget_fits(self) -> None:
        """A budget too short for one step after the set-up is a one-line error, before
        anything is written. A step and an evaluation batch's forward pass are timed on a
        copy of the model (the second of two: the first allocates)."""
        budget = self.budget
        twin = copy.deepcopy(self.model).train()
        knobs = self.tuning.knobs if self.tuning else {"dtype": dtype_name(self.dtype)}
        step = self.candidate_step(twin, knobs)
        x, y = self.fixed_batches(1)[0]
        with torch.random.fork_rng(devices=[]):
            for _ in range(2):
                tick = self.clock()
                step(x, y)
                step_s = (self.clock() - tick) * self.grad_accum
            twin.eval()
            with torch.no_grad(), autocast(self.device, self.dtype):
                for _ in range(2):
                    tick = self.clock()
                    twin(x, y, doc_start=self.doc_start)
                    forward_s = self.clock() - tick
        del twin
        budget.record_step(step_s)
        if self.cfg.eval_interval == 0:  # ten evaluations: together at most EVAL_SHARE
            fit = int(EVAL_SHARE * budget.seconds / (BUDGET_EVALS + 1) / (2 * forward_s))
            self.eval_iters = max(MIN_EVAL_ITERS, min(self.cfg.eval_iters, fit))
        budget.record_eval(forward_s * 2 * self.eval_iters)  # both splits
        if not budget.step_fits() and not budget.spent_before:  # (a resumed run is done)
            need = budget.elapsed() + budget.step_s + budget.finish_s()
            raise TrainingError(f"--time={self.cfg.time} is too short to take one step here: "
                                f"set-up, a step and the final evaluation need about "
                                f"{math.ceil(need)}s; give at least --time={math.ceil(need * 2)}s")

# ---------------------------------------------------------------------- helpers

def load_resume(cfg: TrainConfig, out_dir: Path, meta: dict) -> Resumed:
    """The saved state of the run in out_dir, checked against the settings and dataset."""
    state, run_info = sources.load_resume(out_dir)
    check_resume_matches(cfg, run_info, meta)
    config = sources.model_config(run_info, out_dir, dropout=cfg.dropout)
    return Resumed(state, config, run_info.tuning)


def build_model(cfg: TrainConfig, meta: dict, resumed: Resumed | None, master: bool) -> GPT:
    """The plain model a run starts from: resumed, new, or pretrained; its config is the one
    source of the run's model shape from here on."""
    if resumed is not None:
        model = gpt_from_state(resumed.model_config, resumed.state.model, cfg.out_dir)
    elif cfg.init_from == "scratch":
        shape = {k: getattr(cfg, k) for k in MODEL_SHAPE_KEYS}
        shape["tie_head"] = head_tied(cfg, meta["vocab_size"])
        model = GPT(GPTConfig(vocab_size=meta["vocab_size"], dropout=cfg.dropout, **shape))
    else:
        model = pretrained_model(cfg, meta, master)
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    if master:
        print(f"folio: model has {model.num_params() / 1e6:.2f}M parameters "
              f"({model.num_params(non_embedding=False) / 1e6:.2f}M with position "
              "embeddings)", flush=True)
    return model


def pretrained_model(cfg: TrainConfig, meta: dict, master: bool) -> GPT:
    """The model a finetune starts from (--init_from: a folio run dir, a Hugging Face dir or
    a GPT-2 name); for --task=chat its vocabulary grown by the special tokens the dataset's
    tokenizer added."""
    model, spec = sources.load_for_training(cfg.init_from, cfg.dropout, meta["tokenizer"])
    if cfg.task != "chat":
        if meta["vocab_size"] > model.config.vocab_size:
            raise DataError(f"dataset {cfg.dataset} has {meta['vocab_size']} tokens, more than "
                            f"{cfg.init_from}'s {model.config.vocab_size}; prepare it with "
                            "the model's tokenizer (--tokenizer gpt2 or hf:DIR)")
        return model
    spec = spec or sources.tokenizer_of(cfg.init_from, model.config.vocab_size)
    base = {k: v for k, v in meta["tokenizer"].items() if k != "added"}
    own = {k: v for k, v in spec.items() if k != "added"}
    if base != own or meta["vocab_size"] < model.config.vocab_size:
        raise DataError(f"dataset {cfg.dataset!r} was not prepared with the vocabulary of "
                        f"{cfg.init_from} ({own.get('kind')}, {model.config.vocab_size} tokens); "
                        f"prepare it with `folio prepare CONV.jsonl --format=chat "
                        f"--tokenizer={cfg.init_from}`")
    if meta["vocab_size"] > model.config.vocab_size:
        added = meta["vocab_size"] - model.config.vocab_size
        if master:
            print(f"folio: vocabulary {model.config.vocab_size} -> {meta['vocab_size']}: "
                  f"{added} chat token(s) added, their rows the mean of the others", flush=True)
        model.grow_vocab(meta["vocab_size"])
    return model


def check_task(cfg: TrainConfig, meta: dict) -> None:
    """--task=chat trains on a chat dataset, and a chat dataset only with --task=chat."""
    chat = meta.get("format") == "chat"
    if cfg.task == "chat" and not chat:
        raise DataError(f"--task=chat needs conversations: dataset {cfg.dataset!r} is text; "
                        "prepare a .jsonl of messages with `folio prepare CONV.jsonl "
                        "--format=chat --tokenizer=BASE_RUN`")
    if chat and cfg.task != "chat":
        raise DataError(f"dataset {cfg.dataset!r} holds conversations; train on it with "
                        "--task=chat (the loss on the assistant's tokens only)")


def ensure_dataset(cfg: TrainConfig, info: distributed.DistInfo) -> Path:
    """The prepared dataset dir; tiny Shakespeare is prepared on first use."""
    dataset_dir = Path(cfg.data_dir) / cfg.dataset
    from folio.data.hub import RECIPES
    from folio.data.prepare import KNOWN_DATASETS
    if not (dataset_dir / "meta.json").exists() and cfg.dataset in KNOWN_DATASETS:
        if info.is_master:
            from folio.config import PrepareConfig
            from folio.data.prepare import prepare
            print(f"folio: dataset {cfg.dataset} is not prepared yet; preparing it", flush=True)
            prepare(PrepareConfig(dataset=cfg.dataset, data_dir=cfg.data_dir))
        distributed.barrier(info)
    elif not (dataset_dir / "meta.json").exists():
        how = (f"`folio prepare {cfg.dataset}`" if cfg.dataset in RECIPES
               else f"`folio prepare PATH --name {cfg.dataset}`")
        raise DataError(f"dataset {cfg.dataset!r} not found in {cfg.data_dir}/; prepare it with "
                        f"{how} or pass --data_dir")
    return dataset_dir


def check_resume_matches(cfg: TrainConfig, run_info: RunInfo, meta: dict) -> None:
    """Resuming with another model shape, optimizer or vocabulary is a one-line error (the
    settings were resolved with the checkpoint's shape where none was given)."""
    saved = run_info.model
    for key in MODEL_SHAPE_KEYS:
        if key in saved and getattr(cfg, key) not in (saved[key], AUTO):
            raise CheckpointError(f"cannot resume: {key}={getattr(cfg, key)} but the checkpoint "
                                  f"in {cfg.out_dir} has {key}={saved[key]}; drop the setting "
                                  "or start a new --out_dir")
    saved_opt = (run_info.config or {}).get("optimizer", "adamw")
    if saved_opt != cfg.optimizer:
        raise CheckpointError(f"cannot resume: the checkpoint in {cfg.out_dir} was trained with "
                              f"optimizer={saved_opt} (recipe="
                              f"{run_info.config.get('recipe', 'nanogpt')}), not "
                              f"{cfg.optimizer}; resume with the settings it was trained with")
    saved_tok = run_info.tokenizer
    if saved_tok != meta["tokenizer"]:
        raise CheckpointError(f"cannot resume: dataset {cfg.dataset!r} uses a different "
                              f"vocabulary ({meta['tokenizer'].get('kind')}, "
                              f"{meta['vocab_size']} tokens) than the checkpoint "
                              f"({saved_tok.get('kind')}); use the dataset it was trained on")


def should_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """compile=auto: on CUDA only. On a CPU inductor took 25-65 s (6 s from its cache) and the
    steps were no faster in float32 (`folio bench --variants eager,fast:compile=True`)."""
    if cfg.compile == "auto":
        return device.type == "cuda"
    return bool(cfg.compile)


def check_finite(value: float, iter_num: int, what: str) -> None:
    if not math.isfinite(value):
        raise TrainingError(f"{what} is {value} at iter {iter_num}; the last good checkpoint is "
                            "kept. Try a lower --learning_rate, --dtype=float32 or --grad_clip=1.0")


def estimate_seconds(flops: float, peak: float, device: torch.device) -> str:
    """A rough time guess from FLOPs at a typical utilisation; refined by the ETA on log lines."""
    if not peak:
        return "time unknown (see ETA)"
    typical_mfu = 0.3 if device.type == "cuda" else 0.15
    return f"~{format_duration(flops / (peak * typical_mfu))}"
