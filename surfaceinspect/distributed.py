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

:func:`main` runs the ``train`` command under torchrun::

    torchrun --nproc-per-node 2 -m surfaceinspect.distributed train -m draem ./good --out run --threads 1

Every rank runs the ordinary ``train`` command, so configuration, data split and messages are
those of a single-process run. Rank 0 is the run: it writes the run directory, its checkpoints
(all ranks hold the same weights), the model, and calibrates once at the end. The other ranks
train in a scratch runs folder without writing checkpoints, and leave right after training.
``--resume RUN`` resumes every rank from RUN's checkpoint.

Not here yet (see the issue): CS-Flow (its feature cache built in shards and gathered) is refused
under torchrun; calibration scores are not spread over the ranks (rank 0 scores them alone).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import Dataset

from surfaceinspect.detectors.base import TrainContext, TrainSummary
from surfaceinspect.detectors.draem.detector import DraemDetector
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
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            averaged = flat[offset : offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = averaged.clone()
            else:
                g.copy_(averaged)
            offset += p.numel()


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


class DistributedDraem(DraemDetector):
    """DRAEM trained on all ranks of a process group; see the module docstring.

    ``common.batch_size`` is the global batch (it must divide by the world size); each rank
    trains on ``batch_size / world``. The schedule (steps, epochs, learning-rate milestones) is the
    single-process one. A time budget is refused: ranks timing themselves could stop at
    different steps and leave the others waiting.
    """

    def __init__(self, run_config: Any, device: torch.device) -> None:
        super().__init__(run_config, device)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        broadcast_module(self.model)
        self._per_rank = run_config.common.batch_size // self.world

    def fit(self, images: torch.Tensor, context: TrainContext) -> TrainSummary:
        common, cfg = self.run_config.common, self.cfg
        if self.rank != 0:  # the run is rank 0's: the others neither checkpoint nor report progress
            context = TrainContext(
                checkpoint_every_s=context.checkpoint_every_s,
                resume_state=context.resume_state,
                time_budget_s=context.time_budget_s,
                elapsed_before_s=context.elapsed_before_s,
            )
        if common.batch_size % self.world:
            raise ConfigError(
                f"common.batch_size {common.batch_size} does not divide among {self.world} processes; "
                f"use a multiple of {self.world}"
            )
        if context.time_budget_s > 0:
            raise ConfigError("a time budget is not supported with torchrun; set draem.epochs or draem.steps")
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
        summary.details.update(world_size=self.world, batch_per_rank=self._per_rank)
        if self.rank != 0 and _leave_after_training:
            raise TrainedOnOtherRank
        return summary

    def _synthesis_dataset(self, images: torch.Tensor) -> tuple[Any, bool]:
        dataset, grey = super()._synthesis_dataset(images)
        return RankSlice(dataset, self._per_rank, self.world, self.rank), grey


# ---------------------------------------------------------------------------------------------
# The train command under torchrun


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
            "surfaceinspect.distributed train -m draem GOOD_DIR [train options]\n"
        )
        sys.exit(2)
    try:
        method = _train_method(args[1:])
    except SurfaceInspectError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    if method != "draem":
        sys.stderr.write(f"error: {method} training under torchrun is not supported yet; train it in one process\n")
        sys.exit(2)
    REGISTRY["draem"] = f"{__name__}:DistributedDraem"
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
