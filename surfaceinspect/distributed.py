"""Data-parallel training under ``torchrun`` (PyTorch distributed, gloo on CPU, NCCL on CUDA).

Building blocks, kept apart from the single-process code paths:

* :class:`DistEnv` reads the rank and world size that ``torchrun`` puts in the environment and
  :func:`process_group` joins (and leaves) the process group.
* :class:`GradientAverager` averages the gradients of every rank before each optimiser step
  (one all-reduce of all gradients flattened together), so N ranks of batch ``B/N`` take the step
  one process takes with batch ``B``.
* Each method's package declares its data-parallel detector (``Detector.data_parallel``):
  ``detectors/draem/distributed.py`` trains DRAEM on N ranks, each taking its slice of every
  global batch (:class:`RankSlice`); ``detectors/csflow/distributed.py`` trains CS-Flow on N ranks
  with the feature cache extracted in shards (:func:`shard_bounds`) and summed gradients
  (:func:`sum_gradients`). :class:`RankTraining` is what they share.
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

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import Dataset

from surfaceinspect.detectors.base import TrainContext, TrainSummary
from surfaceinspect.detectors.schedule import TimeBudget
from surfaceinspect.errors import SurfaceInspectError

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


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, stop)`` of ``n`` items (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


# ---------------------------------------------------------------------------------------------
# The train command under torchrun


class TrainedOnOtherRank(BaseException):
    """Raised on ranks > 0 after training: saving and calibration are rank 0's (not an Exception,
    so no error handler of the train command takes it for a failure)."""


def _train_method(args: Sequence[str]) -> str:
    """The method a ``train`` command line trains (as ``train`` resolves it), parsed before any work."""
    import typer

    from surfaceinspect import cli
    from surfaceinspect.config import load_yaml_file
    from surfaceinspect.storage import modeldir

    command = typer.main.get_command(cli.app).get_command(None, "train")  # type: ignore[attr-defined]
    params = command.make_context("train", list(args), resilient_parsing=True).params
    if params.get("resume"):
        return str(modeldir.load_checkpoint(_resolve_resume(params["resume"])).run_config["method"])
    config = params.get("config")
    return str(params.get("method") or (load_yaml_file(config).get("method") if config else None) or "auto")


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
    from surfaceinspect.storage import modeldir

    return modeldir.find_resumable() if value == "latest" else Path(value)


def data_parallel_training() -> bool:
    """True inside :func:`main`: the train command builds each method's data-parallel detector."""
    return _leave_after_training


def _data_parallel_methods() -> list[str]:
    from surfaceinspect.detectors import available_methods, get_detector_class

    return [m for m in available_methods() if get_detector_class(m).data_parallel is not None]


def _usage_error() -> None:
    sys.stderr.write(
        "error: run the train command under torchrun: torchrun --nproc-per-node N -m "
        f"surfaceinspect.distributed train -m {'|'.join(_data_parallel_methods())} GOOD_DIR [train options]\n"
    )
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """``torchrun ... -m surfaceinspect.distributed train ARGS``: see the module docstring."""
    from surfaceinspect import cli

    global _leave_after_training
    args = list(sys.argv[1:] if argv is None else argv)
    env = DistEnv.from_environ()
    if env is None or not args or args[0] != "train":
        _usage_error()
    assert env is not None
    try:
        method = _train_method(args[1:])
    except SurfaceInspectError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    if method not in _data_parallel_methods():
        sys.stderr.write(
            f"error: {method} training under torchrun is not supported; train it in one process "
            f"(data-parallel methods: {', '.join(_data_parallel_methods())})\n"
        )
        sys.exit(2)
    _leave_after_training = True
    trained_for_rank_0 = False
    with process_group(env, env.device()), tempfile.TemporaryDirectory(prefix=f"si-rank{env.rank}-") as scratch:
        if not env.is_main:
            args = _worker_arguments(args, Path(scratch))
            os.environ["SURFACEINSPECT_HOME"] = scratch  # its run is not the latest model of anyone
        sys.argv = ["surfaceinspect", *args]
        try:
            cli.main()
        except TrainedOnOtherRank:
            trained_for_rank_0 = True
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
    if trained_for_rank_0:
        # A rank > 0 has done its part (process group left, scratch removed) while rank 0 still saves and
        # calibrates. Leave without the interpreter's teardown: an abort there (seen in 2 of about 70 test runs:
        # "terminate called without an active exception", SIGABRT) would make torchrun stop rank 0 and lose
        # the finished training.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    # run main() of the imported module (not of __main__), whose flag the data-parallel detectors read
    from surfaceinspect.distributed import main as _main

    _main()
