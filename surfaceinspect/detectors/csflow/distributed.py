"""CS-Flow trained data-parallel under ``torchrun`` (see :mod:`surfaceinspect.distributed`).

The feature cache is extracted in shards (:func:`~surfaceinspect.distributed.shard_bounds`) and
gathered on every rank (:func:`gather_feature_store`); the ranks split every global batch and sum
their weighted gradients (:func:`~surfaceinspect.distributed.sum_gradients`), so the step is the
single-process one up to the order of floating-point sums (no BatchNorm in the flow).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from surfaceinspect.detectors.base import TrainContext, TrainSummary
from surfaceinspect.detectors.csflow.detector import CSFlowDetector
from surfaceinspect.detectors.csflow.features import FeatureStore
from surfaceinspect.detectors.csflow.flow import nll_per_dim
from surfaceinspect.distributed import RankTraining, broadcast_module, shard_bounds, sum_gradients
from surfaceinspect.errors import ConfigError


def gather_feature_store(local: FeatureStore, template: FeatureStore, n: int, chunk: int) -> FeatureStore:
    """Every rank's shard of the feature cache (``local``, the rank's :func:`shard_bounds` of ``n``
    training images) gathered into ``template``, in training-image order, on every rank.

    ``chunk`` images per rank and per all-gather bound the memory in flight (``world * chunk``
    images' features per scale); the last round pads the shorter shards with zeros.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    bounds = [shard_bounds(n, world, q) for q in range(world)]
    local_n = bounds[rank][1] - bounds[rank][0]
    largest = max(stop - start for start, stop in bounds)
    for offset in range(0, largest, chunk):
        mine = local.get(torch.arange(offset, min(offset + chunk, local_n)))
        gathered = []
        for f in mine:
            padded = torch.zeros((chunk, *f.shape[1:]), dtype=f.dtype)
            padded[: len(f)] = f
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
            gathered.append(parts)
        for q, (start, stop) in enumerate(bounds):
            rows = min(chunk, stop - start - offset)
            if rows > 0:
                template.put(start + offset, [parts[q][:rows] for parts in gathered])
    return template


class DistributedCSFlow(RankTraining, CSFlowDetector):
    """CS-Flow trained on all ranks of a process group.

    * Feature cache (``csflow.feature_cache`` memory or disk): each rank extracts the backbone
      features of its contiguous share of the training images, then the shares are gathered
      (all-gather, CPU tensors over gloo) so every rank holds the whole cache in image order.
      With ``none`` nothing is cached: each rank extracts the features of its own batches.
    * Flow: every rank draws the same epoch order (the seed's generator) and takes a disjoint
      slice of each global batch of ``common.batch_size``; each rank's loss is weighted by its
      share of the batch and the gradients (and the loss) summed in one all-reduce, so the step
      is the single-process step on the whole batch, gradient clipping included (it acts on the
      summed gradient). Ranks differ from one process only in floating-point summation order.
    * The schedule and checkpoints are the single-process ones (positions count global batches),
      so a run resumes under any number of processes, or none.
    """

    def fit(self, images: torch.Tensor, context: TrainContext) -> TrainSummary:
        self._join()
        context = self._rank_context(context)
        if len(images) < self.world:
            raise ConfigError(
                f"{len(images)} training images cannot be shared among {self.world} processes; "
                "use fewer processes or more images"
            )
        self._global_batch = 0
        summary = super().fit(images, context)
        n, bs = len(images), min(self.run_config.common.batch_size, len(images))
        return self._finish(summary, batch_per_rank=math.ceil(bs / self.world), feature_shard=math.ceil(n / self.world))

    def _build(self, pretrained: bool) -> None:
        super()._build(pretrained)
        if pretrained:  # building for training: start every rank from rank 0's flow
            assert self.flow is not None
            broadcast_module(self.flow)

    def _feature_store(self, images: torch.Tensor, bs: int, on_progress: Any) -> FeatureStore:
        cfg = self.config
        if cfg.feature_cache == "none":  # features of each rank's own batch slices, extracted as it trains
            return super()._feature_store(images, bs, on_progress)
        assert self.extractor is not None
        start, stop = shard_bounds(len(images), self.world, self.rank)
        local = FeatureStore(
            self.extractor, images[start:stop], cfg.feature_cache, bs, self.device, cfg.cache_dir, on_progress
        )
        try:
            shapes = [a.shape[1:] for a in local.arrays]
            full = FeatureStore.allocated(self.extractor, images, cfg.feature_cache, shapes, self.device, cfg.cache_dir)
            try:
                return gather_feature_store(local, full, len(images), bs)
            except BaseException:
                full.close()
                raise
        finally:
            local.close()

    def _batch_indices(self, perm: torch.Tensor, batch: int, bs: int) -> torch.Tensor:
        idx = super()._batch_indices(perm, batch, bs)
        self._global_batch = len(idx)
        return idx.tensor_split(self.world)[self.rank]

    def _train_step(self, feats: list[torch.Tensor], optimizer: torch.optim.Optimizer, pos: Any) -> float:
        assert self.flow is not None
        optimizer.zero_grad(set_to_none=True)
        local, weight = len(feats[0]), len(feats[0]) / self._global_batch
        loss = torch.zeros(())
        if local:  # the last global batch of an epoch may leave a rank without images
            zs, logdet = self.flow(self._layout(feats))
            loss = nll_per_dim(zs, logdet) * weight
            loss.backward()
        params = [p for p in self.flow.parameters() if p.requires_grad]
        loss_value = sum_gradients(params, 1.0, extra=loss)  # the rank's gradient already carries the weight
        if not math.isfinite(loss_value):  # every rank sees the same sum, so all stop together
            raise self._loss_error(loss_value, pos)
        torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.config.grad_clip)
        optimizer.step()
        return loss_value
