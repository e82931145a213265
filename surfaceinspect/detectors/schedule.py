"""Training-schedule helpers shared by the detectors: the time-budget planner and throughput bookkeeping."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

# Share of the remaining budget the schedule may fill (the rest absorbs timing noise).
BUDGET_SAFETY = 0.95
# Steps the step time is averaged over: long enough to smooth noise, short enough to follow the load.
BUDGET_WINDOW_STEPS = 30


class TimeBudget:
    """Shortens a schedule of ``planned`` steps so that training ends within ``budget_s`` seconds.

    Call :meth:`update` after every step. The step time is measured over the last
    ``window`` steps of this call (the first step, which pays one-off costs, is never timed), so the
    schedule follows the machine's load: it may shrink and grow back, never beyond the plan.
    ``granularity`` keeps the total a multiple of it (e.g. whole epochs), never below the end of
    the unit in progress. ``elapsed_s`` counts the whole training, a resumed run's earlier time
    included, so a resumed run ends within the same budget.
    """

    def __init__(
        self,
        budget_s: float,
        planned: int,
        elapsed_s: Callable[[], float],
        *,
        granularity: int = 1,
        window: int = BUDGET_WINDOW_STEPS,
        safety: float = BUDGET_SAFETY,
    ) -> None:
        self.budget_s = float(budget_s)
        self.planned = int(planned)
        self.elapsed_s = elapsed_s
        self.granularity = max(1, int(granularity))
        self.safety = safety
        self._marks: deque[tuple[int, float]] = deque(maxlen=max(2, window + 1))

    @property
    def enabled(self) -> bool:
        return self.budget_s > 0

    def update(self, step: int, total: int) -> int:
        """The total number of steps to train, given that ``step`` steps are done now."""
        if not self.enabled:
            return total
        self._marks.append((step, time.monotonic()))
        if len(self._marks) < 2:
            return total
        (s0, t0), (s1, t1) = self._marks[0], self._marks[-1]
        per_step = (t1 - t0) / max(s1 - s0, 1)
        remaining = self.budget_s * self.safety - self.elapsed_s()
        fit = step + max(0, int(remaining / max(per_step, 1e-9)))
        g = self.granularity
        unit_end = math.ceil(step / g) * g
        return max(min(unit_end, self.planned), min(self.planned, fit // g * g))

    def note(self, total: int, unit: str = "steps", per_unit: int = 1) -> str | None:
        """A sentence for the training summary when the budget shortened the schedule."""
        if total >= self.planned:
            return None
        return (
            f"schedule set to {total // per_unit} of {self.planned // per_unit} planned {unit} to fit the time budget"
        )


class Throughput:
    """Training images/s of one ``fit`` call: overall, over its first epoch and over the later ones.

    ``one_off_s`` (e.g. feature extraction before the first step) counts towards the first epoch.
    """

    def __init__(self, steps_per_epoch: int, one_off_s: float = 0.0) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.one_off_s = one_off_s
        self.started = time.monotonic()
        self.steps = 0
        self.images = 0
        self._first_epoch: tuple[float, int] | None = None  # (end time, images) of the first epoch

    def step_done(self, n_images: int) -> None:
        self.steps += 1
        self.images += n_images
        if self.steps == self.steps_per_epoch:
            self._first_epoch = (time.monotonic(), self.images)

    def rates(self) -> dict[str, float | None]:
        """``images_per_s``, ``images_per_s_first_epoch`` and ``images_per_s_later_epochs``."""
        now = time.monotonic()
        seconds = now - self.started
        end, first_images = self._first_epoch or (now, self.images)
        later_s = now - end if self._first_epoch else 0.0

        def rate(images: int, s: float) -> float | None:
            return round(images / s, 3) if images and s > 0 else None

        return {
            "images_per_s": rate(self.images, seconds),
            "images_per_s_first_epoch": rate(first_images, end - self.started + self.one_off_s),
            "images_per_s_later_epochs": rate(self.images - first_images, later_s),
        }
