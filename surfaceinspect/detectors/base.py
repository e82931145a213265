"""The interface every anomaly detector implements.

The engine only talks to detectors through this class, so adding a method means adding a
subpackage with a ``Detector`` subclass and one registry entry in ``detectors/__init__.py``.

Conventions shared by all detectors:

* Input images are float tensors ``(B, 3, H, W)`` in [0, 1], RGB, ``(H, W) = common.input_hw()``
  (square or not; each side a multiple of the method's ``size_multiple()``). Detectors that need
  another normalisation (e.g. ImageNet statistics) apply it themselves.
* Training images arrive as one uint8 tensor ``(N, 3, H, W)`` (already decoded and resized, or
  tiles cut from the images at their own resolution when tiling is on).
* ``predict`` returns per-image scores and per-pixel maps at ``H x W``; higher is more anomalous
  and the maps are in the same units as the scores, so one calibration serves both.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from surfaceinspect.config import MethodConfig, RunConfig
from surfaceinspect.detectors.schedule import TimeBudget
from surfaceinspect.detectors.scorer import Scorer as Scorer  # re-exported: the interface lives beside Detector


@dataclass
class Prediction:
    """Output of :meth:`Detector.predict` for one batch (tensors on the CPU, float32)."""

    scores: torch.Tensor  # (B,)
    maps: torch.Tensor  # (B, H, W)


@dataclass
class TrainSummary:
    """What :meth:`Detector.fit` reports about a finished training (stored in ``metadata.json``).

    Every detector fills the same fields, so the engine and the benchmark read them without knowing
    the method; method-specific facts (backbone, anomaly source, ...) go into ``details``.
    """

    steps: int  # optimiser steps done in total (before a resume included)
    planned_steps: int  # steps the configuration asked for (``steps < planned_steps``: budget or early stop)
    epochs: float  # passes over the training images (fractional where steps do not fill an epoch)
    seconds: float  # training wall time, including the time spent before a resume
    final_loss: float | None
    images_per_s: float | None = None  # training throughput of this call
    images_per_s_first_epoch: float | None = None  # includes one-off work (feature extraction, warm-up)
    images_per_s_later_epochs: float | None = None  # None if only one epoch ran
    resumed_from_step: int | None = None
    schedule_note: str | None = None  # why the schedule differs from the plan (time budget, early stop)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-able dict: the standard fields, then ``details``."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "details"}
        return {**out, **self.details}


@dataclass
class TrainProgress:
    """One progress report from :meth:`Detector.fit`."""

    phase: str  # short label shown on the progress bar, e.g. "features" or "train"
    step: int  # steps done in this phase
    total: int  # steps in this phase (may change once, e.g. after fitting a time budget)
    loss: float | None = None
    info: dict[str, float] = field(default_factory=dict)
    # False for one-off phases that are not optimiser steps (e.g. feature extraction): a pause
    # (``TrainContext.pause_at_step``) only ever counts optimiser steps.
    optimiser_steps: bool = True


class TrainingPaused(Exception):
    """Raised by :meth:`TrainContext.report` when training reached ``pause_at_step``.

    The checkpoint of that step has been written; resuming from it continues the same schedule.
    """

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"training paused at step {step} of {total}")
        self.step = step
        self.total = total


class TrainContext:
    """What the engine hands to :meth:`Detector.fit`: progress, checkpoints, resume state, budget.

    A detector calls :meth:`report` after each step; when a checkpoint is due the context calls
    ``state_fn`` and passes the result to the engine's checkpoint writer. On resume,
    :attr:`resume_state` holds the dict of the last checkpoint (as saved by ``state_fn``), and
    :meth:`elapsed_s` counts the training time spent before the interruption too, so that a
    resumed run ends within the same ``time_budget_s`` as an uninterrupted one.

    ``pause_at_step`` (``--method auto``'s probes) stops training once that many optimiser steps
    are done (or the schedule ends first): the context writes a checkpoint and raises
    :class:`TrainingPaused`, so the probe is exactly the first steps of the full schedule and
    resuming the checkpoint finishes it.
    """

    def __init__(
        self,
        on_progress: Callable[[TrainProgress], None] | None = None,
        on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
        checkpoint_every_s: float = 120.0,
        resume_state: dict[str, Any] | None = None,
        time_budget_s: float = 0.0,
        elapsed_before_s: float = 0.0,
        pause_at_step: int | None = None,
    ) -> None:
        self._on_progress = on_progress
        self._on_checkpoint = on_checkpoint
        self.checkpoint_every_s = checkpoint_every_s
        self.resume_state = resume_state
        self.time_budget_s = time_budget_s
        self.elapsed_before_s = elapsed_before_s
        self.pause_at_step = pause_at_step
        self.started = time.monotonic()
        self._last_checkpoint = self.started

    def elapsed_s(self) -> float:
        """Training seconds so far, including those before a resume."""
        return self.elapsed_before_s + time.monotonic() - self.started

    def report(self, progress: TrainProgress, state_fn: Callable[[], dict[str, Any]] | None = None) -> None:
        """Report progress; write a checkpoint from ``state_fn()`` if one is due (or pause, see the class)."""
        if self._on_progress is not None:
            self._on_progress(progress)
        if self._pause_due(progress) and state_fn is not None:
            self.checkpoint_now(state_fn())
            raise TrainingPaused(progress.step, progress.total)
        now = time.monotonic()
        if (
            state_fn is not None
            and self._on_checkpoint is not None
            and now - self._last_checkpoint >= self.checkpoint_every_s
        ):
            self._on_checkpoint(state_fn())
            self._last_checkpoint = time.monotonic()

    def _pause_due(self, progress: TrainProgress) -> bool:
        if self.pause_at_step is None or not progress.optimiser_steps:
            return False
        return progress.step >= min(self.pause_at_step, progress.total)

    def checkpoint_now(self, state: dict[str, Any]) -> None:
        """Write a checkpoint unconditionally (e.g. at the end of a phase)."""
        if self._on_checkpoint is not None:
            self._on_checkpoint(state)
            self._last_checkpoint = time.monotonic()


class Detector(ABC):
    """An anomaly detector: fit on good images, then score images and localise anomalies (a :class:`Scorer`)."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    # "module:Class" of this method's data-parallel detector, trained under torchrun
    # (``python -m surfaceinspect.distributed``); None: the method trains in one process only
    data_parallel: ClassVar[str | None] = None

    def __init__(self, run_config: RunConfig, device: torch.device) -> None:
        self.run_config = run_config
        self.device = device

    @property
    def config(self) -> MethodConfig:
        """This detector's method hyperparameters."""
        return self.run_config.method_config

    @property
    def input_size(self) -> tuple[int, int]:
        """The network input ``(H, W)``."""
        return self.run_config.common.input_hw()

    @abstractmethod
    def fit(self, images: torch.Tensor, context: TrainContext) -> TrainSummary:
        """Train on good images ``(N, 3, H, W)`` uint8; return the training summary.

        :class:`TrainSummary` carries the facts every method reports (the benchmark reads them);
        method-specific facts go into its ``details``.

        Must call ``context.report`` regularly, honour ``context.resume_state`` (continue from a
        checkpoint dict produced by the ``state_fn`` it passed to ``report``) and
        ``context.time_budget_s`` (> 0: shorten the schedule to fit it).
        """

    def time_budget(self, budget_s: float, planned: int, elapsed_s: Callable[[], float], **options: Any) -> TimeBudget:
        """The planner that fits the schedule into ``budget_s`` (see :class:`TimeBudget`); ``fit`` gets it here
        so that data-parallel training can make all processes agree on it."""
        return TimeBudget(budget_s, planned, elapsed_s, **options)

    def init_random_weights(self) -> None:  # noqa: B027 - optional hook; doing nothing is the right default
        """Build the networks with random weights, needing no trained or pretrained file.

        For speed measurements and tests of the inference path (timing does not depend on the
        weights). Detectors that build their networks in the constructor need not override it.
        """

    @abstractmethod
    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a batch ``(B, 3, H, W)`` float in [0, 1]; return CPU float32 scores and ``(B, H, W)`` maps."""

    def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` on numpy arrays (the :class:`Scorer` interface the scoring engine uses)."""
        prediction = self.predict(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        return (
            prediction.scores.numpy().astype(np.float32, copy=False),
            prediction.maps.numpy().astype(np.float32, copy=False),
        )

    def inference_module(self) -> torch.nn.Module:
        """``predict`` as one float32 ``nn.Module`` for export: images ``(B, 3, H, W)`` in [0, 1] -> (scores, maps).

        The module must compute what :meth:`predict` returns (its scores and maps, in the same
        units); ``surfaceinspect export`` checks this on real images before writing an artefact.
        """
        raise NotImplementedError(f"the {self.name} detector cannot be exported")

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed for inference, as a flat dict of tensors (saved as safetensors)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
