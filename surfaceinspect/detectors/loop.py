"""The resumable training loop both detectors train with (each supplies its step and its state)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from surfaceinspect.detectors.base import TrainContext, TrainProgress
from surfaceinspect.detectors.schedule import Throughput, TimeBudget


@dataclass
class StepOutcome:
    """What one training step of a detector reports to the :class:`TrainingLoop`."""

    loss: float
    images: int  # images the step trained on (throughput)


def _nothing_more() -> tuple[dict[str, float], bool]:
    return {}, False


@dataclass
class TrainingLoop:
    """The resumable loop every detector trains with.

    It owns the step counter and the schedule's length (:attr:`step`, :attr:`total`, in optimiser
    steps: the detector's checkpoint state reads them), shortens the schedule to the time budget
    (to whole units of ``granularity`` steps, e.g. epochs), counts the throughput, and reports
    progress after every step, through which :class:`~surfaceinspect.detectors.base.TrainContext`
    writes the checkpoints when they are due (and pauses ``--method auto``'s probes).

    The detector supplies its step (``train_step``: one optimiser step, at :attr:`step` of
    :attr:`total`), its checkpoint state (``state_fn``) and, optionally, what to add to the
    progress after a step and whether to stop early (``after_step``, which sees the updated
    :attr:`step` and :attr:`total`). A run resumed from a checkpoint starts at its ``step``.
    """

    context: TrainContext
    budget: TimeBudget
    meter: Throughput
    step: int  # optimiser steps done
    total: int  # steps to train (the plan, or fewer to fit the time budget)
    phase: str = "train"  # the progress bar's label
    granularity: int = 1  # the schedule is shortened to whole units of this many steps
    loss: float | None = None  # the loss of the last step

    def run(
        self,
        train_step: Callable[[], StepOutcome],
        state_fn: Callable[[], dict[str, Any]],
        after_step: Callable[[], tuple[dict[str, float], bool]] = _nothing_more,
    ) -> None:
        """Train until :attr:`total` steps are done (or ``after_step`` says stop)."""
        # A report before the first step: a run resumed at its pause step pauses again at once.
        self.context.report(TrainProgress(self.phase, self.step, self.total), state_fn)
        while self.step < self.total:
            outcome = train_step()
            self.step += 1
            self.loss = outcome.loss
            self.meter.step_done(outcome.images)
            g = max(1, self.granularity)
            self.total = self.budget.update(self.step, self.total) // g * g
            info, stop = after_step()
            self.context.report(TrainProgress(self.phase, self.step, self.total, outcome.loss, info), state_fn)
            if stop:
                break
