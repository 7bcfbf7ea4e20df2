"""A wall-clock budget for a training run (`folio train --time=10m`).

The run plans on the clock, not on an iteration count guessed up front: the learning-rate
decay follows the fraction of the training time spent, and a step is taken only while it, the
final evaluation and the final save still fit. Everything in the run (set-up, the speed
measurement, evaluations, checkpoints) counts, so the run ends at the deadline with a finished
model. Step, evaluation and save times are measured as the run goes; with an injected clock
the same budget and the same step times give the same schedule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

STEP_EMA = 0.2  # weight of the newest step in the step-time estimate
SAVE_GUESS_S = 0.5  # a save's time before one was measured
MARGIN = 1.2  # the final evaluation and save are planned at this multiple of their measured time
EXIT_S = 0.5  # and the process's exit after them (closing files, the interpreter's teardown)
CARD_SAMPLE_S = 1.5  # the most the report card's samples take at the end of a run...
CARD_SAMPLE_SHARE = 0.01  # ...and at most this share of a budget
CARD_OVERHEAD_S = 0.3  # the card's other work: loading the best weights, writing the page


def card_sample_seconds(budget_s: float | None) -> float:
    """What the report card written when a run ends may spend sampling."""
    return CARD_SAMPLE_S if not budget_s else min(CARD_SAMPLE_S, CARD_SAMPLE_SHARE * budget_s)


def card_seconds(budget_s: float) -> float:
    """What a budgeted run keeps for its report card after the final save."""
    return card_sample_seconds(budget_s) + CARD_OVERHEAD_S


@dataclass
class Budget:
    """`seconds` of wall time for the whole run, `spent_before` of them by the run resumed;
    `started` is the clock's reading when this process's share began."""

    seconds: float
    spent_before: float = 0.0
    clock: Callable[[], float] = time.monotonic
    started: float | None = None
    step_s: float = 0.0  # a step's time (exponential moving average of the measured ones)
    eval_s: float = 0.0  # the last evaluation's time
    save_s: float = SAVE_GUESS_S  # the last save's time
    after_s: float = 0.0  # kept for what follows the final save (the report card)

    def __post_init__(self) -> None:
        if self.started is None:
            self.started = self.clock()

    def elapsed(self) -> float:
        """Seconds of the budget spent so far (this process and the runs it resumes)."""
        return self.spent_before + self.clock() - self.started

    def finish_s(self) -> float:
        """What the end of the run needs: the final evaluation and save, with a margin, what
        follows them (the report card) and the process's exit."""
        return MARGIN * (self.eval_s + self.save_s) + self.after_s + EXIT_S

    def progress(self) -> float:
        """The fraction of the training time spent, 0..1: the schedule's clock. Training time
        is the budget less what the final evaluation and save need."""
        return min(1.0, max(0.0, self.elapsed() / max(1e-9, self.seconds - self.finish_s())))

    def step_fits(self) -> bool:
        """Whether one more step, then the final evaluation and save, end by the deadline."""
        return self.elapsed() + self.step_s + self.finish_s() <= self.seconds

    def record_step(self, seconds: float) -> None:
        self.step_s = seconds if not self.step_s else (STEP_EMA * seconds
                                                       + (1 - STEP_EMA) * self.step_s)

    def record_eval(self, seconds: float) -> None:
        self.eval_s = seconds

    def record_save(self, seconds: float) -> None:
        self.save_s = seconds

    def left(self) -> float:
        return self.seconds - self.elapsed()
