"""Data-parallel training under ``torchrun`` (PyTorch distributed, gloo on CPU, NCCL on CUDA).

Building blocks, kept apart from the single-process code paths:

* :class:`DistEnv` reads the rank and world size that ``torchrun`` puts in the environment and
  :func:`process_group` joins (and leaves) the process group.
* :class:`GradientAverager` averages the gradients of every rank before each optimiser step
  (one all-reduce of all gradients flattened together), so N ranks of batch ``B/N`` take the step
  one process takes with batch ``B``.
* :class:`DistributedDraem` trains DRAEM on N ranks. DRAEM's training samples are a pure function
  of (seed, global sample index), so rank ``r`` takes the indices ``step*B + r*B/N ...
  step*B + (r+1)*B/N - 1`` of every global batch (:class:`RankSlice`): each rank synthesises its
  own anomalies, and together the ranks see exactly the samples, in the same steps, that a single
  process with batch ``B`` sees. The one difference: BatchNorm normalises with the statistics of
  the rank's ``B/N`` samples (SyncBatchNorm exists for CUDA only); the running statistics are
  averaged over the ranks at the end, so every rank holds the same model.
* :class:`DistributedCSFlow` trains CS-Flow on N ranks: the feature cache is extracted in shards
  (:func:`shard_bounds`) and gathered on every rank (:func:`gather_feature_store`); the ranks
  split every global batch and sum their weighted gradients (:func:`sum_gradients`), so the step
  is the single-process one up to the order of floating-point sums (no BatchNorm in the flow).
* :class:`RankConsistentBudget`: with a time budget, rank 0 times the steps and decides the
  schedule for every rank (ranks timing themselves would stop at different steps).

:func:`main` runs the ``train`` command under torchrun::

    torchrun --nproc-per-node 2 -m surfaceinspect.distributed train -m draem ./good --out run --threads 1

Every rank runs the ordinary ``train`` command, so configuration, data split and messages are
those of a single-process run. Rank 0 is the run: it writes the run directory, its checkpoints
(all ranks hold the same weights), the model, and calibrates once at the end. The other ranks
train in a scratch runs folder without writing checkpoints, and leave right after training.
``--resume RUN`` resumes every rank from RUN's checkpoint; checkpoints count global batches, so
a run resumes under another number of processes, or in one process.

Calibration: rank 0 scores the calibration images alone, after training, exactly as a single
process does (same images, same model, so the same calibration). Spreading the scoring over the
ranks and gathering the scores would only save wall time, and the calibration set is a small
held-out share of the images, scored in one forward pass each, against many epochs of training.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import Dataset

from surfaceinspect.detectors.base import TrainContext, TrainSummary
from surfaceinspect.detectors.csflow.detector import CSFlowDetector, FeatureStore
from surfaceinspect.detectors.csflow.flow import nll_per_dim
from surfaceinspect.detectors.draem.detector import DraemDetector
from surfaceinspect.detectors.draem.sources import AnomalySource
from surfaceinspect.detectors.draem.synthesis import SynthesisParams
from surfaceinspect.detectors.schedule import TimeBudget
from surfaceinspect.errors import ConfigError, SurfaceInspectError

# A rank that fails leaves the others waiting in a collective; they give up after this long.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
_leave_after_training = False  # set by main(): ranks > 0 leave the train command after fit


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a ``torchrun`` job."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> DistEnv | None:
        """The job torchrun started this process in (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or None."""
        env = os.environ if environ is None else environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files (model, checkpoints, calibration); the others only train."""
        return self.rank == 0

    def device(self, requested: str = "auto") -> torch.device:
        """CUDA device ``LOCAL_RANK`` when CUDA is requested (or ``auto`` and present), else the CPU."""
        if requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available()):
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """Join the job's process group (NCCL for CUDA, gloo for the CPU) for the duration of the block."""
    # gloo for CPU tensors always; NCCL for CUDA tensors where there are GPUs
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


class GradientAverager:
    """Averages gradients over all ranks before every optimiser step of ``module``'s parameters.

    Uses the optimiser step pre-hook, so the training loop stays the single-process one. One
    all-reduce per step over all gradients flattened into one buffer (no overlap with backward:
    fine for the gloo/CPU case and small models; DDP's bucketing would overlap on GPUs).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = {id(p) for p in module.parameters() if p.requires_grad}
        self.world = dist.get_world_size()
        self._handle: Any = None

    def __enter__(self) -> GradientAverager:
        self._handle = register_optimizer_step_pre_hook(self._average)
        return self

    def __exit__(self, *_: object) -> None:
        self._handle.remove()

    def _average(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if id(p) in self.params]
        if params:
            sum_gradients(params, 1.0 / self.world)


def sum_gradients(params: Sequence[torch.Tensor], weight: float, extra: torch.Tensor | None = None) -> float:
    """Replace each gradient by the sum over ranks of ``weight * gradient`` (one all-reduce).

    A parameter without a gradient counts as zeros (a rank with no samples in a step still takes
    part). ``extra`` (a scalar, e.g. the rank's weighted loss) is summed in the same all-reduce;
    the sum is returned (NaN when ``extra`` is None).
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    tail = torch.zeros(1) if extra is None else extra.detach().reshape(1)
    flat = torch.cat([*(g.reshape(-1) * weight for g in grads), tail.to(grads[0])])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        summed = flat[offset : offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = summed.clone()
        else:
            g.copy_(summed)
        offset += p.numel()
    return float(flat[-1]) if extra is not None else math.nan


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s parameters and buffers (identical starting points)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src)


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks."""
    world = dist.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer.data)
            buffer.data.div_(world)


class RankSlice(Dataset):
    """Rank ``rank``'s share of a dataset indexed by global sample index (``step * batch + j``).

    Local index ``k`` (the rank's loader counts ``step * per_rank + j``) maps to global index
    ``step * per_rank * world + rank * per_rank + j``: the ranks split every global batch.
    """

    def __init__(self, dataset: Dataset, per_rank: int, world: int, rank: int) -> None:
        self.dataset, self.per_rank, self.world, self.rank = dataset, per_rank, world, rank

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def global_index(self, local_index: int) -> int:
        step, j = divmod(local_index, self.per_rank)
        return step * self.per_rank * self.world + self.rank * self.per_rank + j

    def __getitem__(self, local_index: int) -> Any:
        return self.dataset[self.global_index(local_index)]


class RankConsistentBudget(TimeBudget):
    """A :class:`TimeBudget` decided by rank 0 alone and broadcast after every step.

    Ranks timing themselves would disagree (their step times differ) and stop at different steps,
    leaving the others waiting in a collective; rank 0's clock is the run's (its ``elapsed_s``,
    its checkpoints), so its schedule is the one every rank follows. One broadcast of one integer
    per step (nothing without a budget).
    """

    def update(self, step: int, total: int) -> int:
        if not self.enabled:
            return total
        decided = torch.tensor([super().update(step, total) if dist.get_rank() == 0 else total], dtype=torch.int64)
        dist.broadcast(decided, 0)
        return int(decided)


class RankTraining:
    """What every data-parallel detector shares: rank 0 owns the run, the ranks agree on the schedule."""

    world: int
    rank: int

    def _join(self) -> None:
        self.world, self.rank = dist.get_world_size(), dist.get_rank()

    def time_budget(self, budget_s: float, planned: int, elapsed_s: Callable[[], float], **options: Any) -> TimeBudget:
        return RankConsistentBudget(budget_s, planned, elapsed_s, **options)

    def _rank_context(self, context: TrainContext) -> TrainContext:
        """``context`` on rank 0; on the others the same schedule without checkpoints or progress."""
        if self.rank == 0:
            return context
        return TrainContext(
            checkpoint_every_s=context.checkpoint_every_s,
            resume_state=context.resume_state,
            time_budget_s=context.time_budget_s,
            elapsed_before_s=context.elapsed_before_s,
        )

    def _finish(self, summary: TrainSummary, **details: Any) -> TrainSummary:
        """Add the job's facts to the summary (throughput summed over the ranks); ranks > 0 leave here."""
        rates = ("images_per_s", "images_per_s_first_epoch", "images_per_s_later_epochs")
        values = torch.tensor([getattr(summary, k) or math.nan for k in rates], dtype=torch.float64)
        dist.all_reduce(values)
        for key, value in zip(rates, values.tolist(), strict=True):
            setattr(summary, key, None if math.isnan(value) else round(value, 3))
        summary.details.update(world_size=self.world, **details)
        if self.rank != 0 and _leave_after_training:
            raise TrainedOnOtherRank
        return summary


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


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, stop)`` of ``n`` items (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


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


# ---------------------------------------------------------------------------------------------
# The train command under torchrun


# method -> its data-parallel Detector class in this module
DATA_PARALLEL = {"draem": "DistributedDraem", "csflow": "DistributedCSFlow"}


class TrainedOnOtherRank(BaseException):
    """Raised on ranks > 0 after training: saving and calibration are rank 0's (not an Exception,
    so no error handler of the train command takes it for a failure)."""


def _train_method(args: Sequence[str]) -> str:
    """The method a ``train`` command line trains (as ``train`` resolves it), parsed before any work."""
    import typer

    from surfaceinspect import cli, modeldir
    from surfaceinspect.config import load_yaml_file

    command = typer.main.get_command(cli.app).get_command(None, "train")  # type: ignore[attr-defined]
    params = command.make_context("train", list(args), resilient_parsing=True).params
    if params.get("resume"):
        return str(modeldir.load_checkpoint(_resolve_resume(params["resume"])).run_config["method"])
    config = params.get("config")
    return params.get("method") or (load_yaml_file(config).get("method") if config else None) or "draem"


def _worker_arguments(args: Sequence[str], scratch: Path) -> list[str]:
    """The train arguments of a rank > 0: its run directory in ``scratch``, quiet.

    With ``--resume RUN`` the rank resumes from a copy of RUN (rank 0 writes RUN itself). Click
    takes the last value of a repeated option, so appending overrides the user's ``--out``.
    """
    args = list(args)
    for flag in ("--resume",):
        if flag in args:
            index = args.index(flag) + 1
            source = _resolve_resume(args[index])
            copy = scratch / "resume"
            shutil.copytree(source, copy)
            return [*args, "--resume", str(copy), "-q"]
    return [*args, "--out", str(scratch / "run"), "-q"]


def _resolve_resume(value: str) -> Path:
    from surfaceinspect import modeldir

    return modeldir.find_resumable() if value == "latest" else Path(value)


def main(argv: Sequence[str] | None = None) -> None:
    """``torchrun ... -m surfaceinspect.distributed train ARGS``: see the module docstring."""
    from surfaceinspect import cli
    from surfaceinspect.detectors import REGISTRY

    global _leave_after_training
    args = list(sys.argv[1:] if argv is None else argv)
    env = DistEnv.from_environ()
    if env is None or not args or args[0] != "train":
        sys.stderr.write(
            "error: run the train command under torchrun: torchrun --nproc-per-node N -m "
            "surfaceinspect.distributed train -m draem|csflow GOOD_DIR [train options]\n"
        )
        sys.exit(2)
    try:
        method = _train_method(args[1:])
    except SurfaceInspectError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    if method not in DATA_PARALLEL:
        sys.stderr.write(f"error: {method} training under torchrun is not supported; train it in one process\n")
        sys.exit(2)
    REGISTRY[method] = f"{__name__}:{DATA_PARALLEL[method]}"
    _leave_after_training = True
    with process_group(env, env.device()), tempfile.TemporaryDirectory(prefix=f"si-rank{env.rank}-") as scratch:
        if not env.is_main:
            args = _worker_arguments(args, Path(scratch))
            os.environ["SURFACEINSPECT_HOME"] = scratch  # its run is not the latest model of anyone
        sys.argv = ["surfaceinspect", *args]
        try:
            cli.main()
        except TrainedOnOtherRank:
            pass
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise


if __name__ == "__main__":
    main()
