"""DRAEM trained data-parallel under ``torchrun`` (see :mod:`surfaceinspect.distributed`).

DRAEM's training samples are a pure function of (seed, global sample index), so rank ``r`` takes
its slice of every global batch (:class:`~surfaceinspect.distributed.RankSlice`): each rank
synthesises its own anomalies, and together the ranks see exactly the samples, in the same steps,
that a single process with the whole batch sees. The one difference: BatchNorm normalises with
the statistics of the rank's share of the batch (SyncBatchNorm exists for CUDA only); the running
statistics are averaged over the ranks at the end, so every rank holds the same model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from surfaceinspect.detectors.base import TrainContext, TrainSummary
from surfaceinspect.detectors.draem.detector import DraemDetector
from surfaceinspect.detectors.draem.sources import AnomalySource
from surfaceinspect.detectors.draem.synthesis import SynthesisParams
from surfaceinspect.distributed import GradientAverager, RankSlice, RankTraining, average_buffers, broadcast_module
from surfaceinspect.errors import ConfigError


class DistributedDraem(RankTraining, DraemDetector):
    """DRAEM trained on all ranks of a process group; see the module docstring.

    ``common.batch_size`` is the global batch (it must divide by the world size); each rank
    trains on ``batch_size / world``. The schedule (steps, epochs, learning-rate milestones) is the
    single-process one.
    """

    def __init__(self, run_config: Any, device: torch.device) -> None:
        if run_config.method_config.members > 1:
            raise ConfigError(
                f"draem.members={run_config.method_config.members}: an ensemble trains its models one after "
                "another; train it without torchrun, or train one model (draem.members=1) on all processes"
            )
        super().__init__(run_config, device)
        self._join()
        broadcast_module(self.model)
        self._per_rank = run_config.common.batch_size // self.world

    def fit(self, images: torch.Tensor, context: TrainContext) -> TrainSummary:
        common, cfg = self.run_config.common, self.cfg
        context = self._rank_context(context)
        if common.batch_size % self.world:
            raise ConfigError(
                f"common.batch_size {common.batch_size} does not divide among {self.world} processes; "
                f"use a multiple of {self.world}"
            )
        batch, steps = common.batch_size, cfg.steps
        if steps <= 0:  # the plan in global batches, as a single process would count it
            cfg.steps = cfg.epochs * math.ceil(images.shape[0] / batch)
        common.batch_size = self._per_rank
        try:
            with GradientAverager(self.model):
                summary = super().fit(images, context)
            average_buffers(self.model)
            self._fast = None
        finally:
            common.batch_size, cfg.steps = batch, steps
        summary.epochs = round(summary.steps * batch / images.shape[0], 3)
        return self._finish(summary, batch_per_rank=self._per_rank)

    def _synthesis_dataset(
        self, nhwc: np.ndarray, source: AnomalySource, params: SynthesisParams, seed: int
    ) -> Dataset:
        return RankSlice(super()._synthesis_dataset(nhwc, source, params, seed), self._per_rank, self.world, self.rank)
