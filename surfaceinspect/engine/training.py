"""Training: plans, resume, fitting a detector, its run directory and calibration."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surfaceinspect.analysis.calibration import Calibration
from surfaceinspect.config import RunConfig, run_config_from_dict
from surfaceinspect.data.imageio import greyscale, supported_suffixes
from surfaceinspect.data.streaming import load_training_images
from surfaceinspect.data.tiling import load_training_tiles
from surfaceinspect.detectors import Detector, TrainContext, TrainingPaused, get_detector_class
from surfaceinspect.device import configure_threads, resolve_device
from surfaceinspect.engine.calibration import calibrate_detector, labelled_split
from surfaceinspect.engine.geometry import aspect_summary, geometry_text, resolve_geometry, suggest_profile
from surfaceinspect.engine.inputs import (
    colour_mode,
    find_images,
    refuse_labelled_folder,
    relative_name,
    report_failures,
    split_calibration,
)
from surfaceinspect.errors import ConfigError, DatasetError
from surfaceinspect.storage import modeldir
from surfaceinspect.storage.atomic import write_json_atomic
from surfaceinspect.storage.outputs import OutputLock, lock_output, prepare_output_dir
from surfaceinspect.ui import Reporter, TrainProgressView, plural


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    calibration: Calibration
    model_id: str = ""


@dataclass
class TrainingPlan:
    """Everything a training run needs, decided before any image is read.

    A new run (:func:`plan_training`) and a resumed one (:func:`plan_resume`, from the
    checkpoint) produce the same plan; :func:`execute_training` runs either.
    """

    run_config: RunConfig  # geometry resolved (``keep:L`` is already ``[H, W]``)
    data_dir: Path
    train_files: list[Path]
    calibration_files: list[Path]  # the held-out split; empty with ``calibration_dir``
    calibration_dir: Path | None  # labelled calibration folder (good/ + defect subfolders)
    run_dir: Path
    resume_state: dict[str, Any] | None = None  # the detector's checkpoint state
    seconds_before: float = 0.0  # training seconds spent before the checkpoint
    lock: OutputLock | None = None  # of ``run_dir``, held until the run ends (see ``release``)

    def release(self) -> None:
        """Give up the run directory's lock (the plan has been run, or will not be)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def resumed(self) -> bool:
        return self.resume_state is not None



def prepare_device(run_config: RunConfig) -> torch.device:
    """Threads, seed and device of a training run."""
    configure_threads(run_config.common.threads)
    torch.manual_seed(run_config.common.seed)
    return resolve_device(run_config.common.device)

def _detector_class(method: str) -> type[Detector]:
    """The method's detector; its data-parallel variant when the train command runs under torchrun."""
    from surfaceinspect.distributed import data_parallel_training

    return get_detector_class(method, data_parallel=data_parallel_training())


def train(
    data_dir: Path,
    run_config: RunConfig,
    *,
    reporter: Reporter | None = None,
    run_dir: Path | None = None,
    calibration_dir: Path | None = None,
    files: Sequence[Path] | None = None,
    force: bool = False,
    mark_latest: bool = False,
) -> TrainResult:
    """Train a detector on good images, calibrate it, and write a finished model directory.

    ``calibration_dir`` (good/ + defect subfolders) replaces the held-out split as the
    calibration set; it is required for calibration modes f1 and recall. ``files`` restricts
    training to these images of ``data_dir`` (default: every image found in it; a labelled folder
    is then refused). ``run_dir`` follows the output rules (:mod:`surfaceinspect.storage.outputs`); a
    folder holding a model is replaced only with ``force``. ``mark_latest`` makes the run the
    default model of ``score`` and ``heatmap``.
    """
    reporter = reporter or Reporter(quiet=True)
    plan = plan_training(
        data_dir,
        run_config,
        reporter=reporter,
        run_dir=run_dir,
        calibration_dir=calibration_dir,
        files=files,
        force=force,
    )
    try:
        return execute_training(plan, reporter=reporter, mark_latest=mark_latest)
    finally:
        plan.release()


def resume(run_dir: Path, *, reporter: Reporter | None = None, mark_latest: bool = False) -> TrainResult:
    """Continue an interrupted run from its last checkpoint (config, data and calibration folder from it)."""
    reporter = reporter or Reporter(quiet=True)
    # Locked before the checkpoint is read: two resumes of one run would write one checkpoint.
    with lock_output(run_dir, "--resume", None):
        return execute_training(plan_resume(run_dir, reporter=reporter), reporter=reporter, mark_latest=mark_latest)


def plan_training(
    data_dir: Path,
    run_config: RunConfig,
    *,
    reporter: Reporter,
    run_dir: Path | None = None,
    calibration_dir: Path | None = None,
    files: Sequence[Path] | None = None,
    force: bool = False,
) -> TrainingPlan:
    """Check a new run before any work: resources, data split, calibration set, geometry, run directory."""
    # Absolute from here on: the checkpoint and the model's metadata keep these paths, and
    # `train --resume` or a recalibration may run from another working directory.
    data_dir = data_dir.absolute()
    calibration_dir = calibration_dir.absolute() if calibration_dir is not None else None
    files = [f.absolute() for f in files] if files is not None else None
    run_config.method_config.check_resources()  # e.g. pretrained weights: fail before reading data
    require_labelled_calibration(run_config, calibration_dir)
    train_files, calibration_files = training_split(data_dir, run_config, calibration_dir, files, reporter)
    if calibration_dir is not None:
        labelled_split(calibration_dir)  # a broken calibration folder fails now, not after training
    resolve_geometry(run_config, train_files, reporter)
    suggest_profile(run_config, train_files, reporter)
    inputs = [data_dir, *([calibration_dir] if calibration_dir else [])]
    run_dir, lock = prepare_run_dir(run_dir, run_config.method, inputs, force, reporter)
    return TrainingPlan(run_config, data_dir, train_files, calibration_files, calibration_dir, run_dir, lock=lock)


def plan_resume(run_dir: Path, *, reporter: Reporter) -> TrainingPlan:
    """The plan of an interrupted run, from its checkpoint."""
    checkpoint = modeldir.load_checkpoint(run_dir)
    method = str(checkpoint.run_config["method"])
    run_config = run_config_from_dict(get_detector_class(method).config_cls, checkpoint.run_config)
    run_config.method_config.check_resources()
    data_dir = Path(checkpoint.data_dir)
    calibration_dir = Path(checkpoint.calibration_dir) if checkpoint.calibration_dir else None
    if calibration_dir is not None:
        labelled_split(calibration_dir)
    reporter.info(f"resuming {run_dir} ({method}, data {data_dir})")
    return TrainingPlan(
        run_config,
        data_dir,
        [data_dir / f for f in checkpoint.train_files],
        [data_dir / f for f in checkpoint.calibration_files],
        calibration_dir,
        run_dir,
        resume_state=checkpoint.detector_state,
        seconds_before=checkpoint.train_seconds,
    )


def require_labelled_calibration(run_config: RunConfig, calibration_dir: Path | None) -> None:
    mode = run_config.common.calibration.mode
    if mode != "quantile" and calibration_dir is None:
        raise ConfigError(
            f"calibration mode {mode} needs defective examples: pass --calibration-dir DIR with good/ and "
            "defect subfolders, or use mode quantile"
        )


def execute_training(
    plan: TrainingPlan,
    *,
    reporter: Reporter,
    mark_latest: bool = False,
    metadata_fn: Callable[[Detector, Calibration], dict[str, Any]] | None = None,
) -> TrainResult:
    """Read the training images (or tiles), fit, save the model, calibrate it; remove the checkpoint.

    ``metadata_fn(detector, calibration)`` returns entries stored in the model's ``metadata.json``
    beside the training summary (``--method auto`` keeps its candidate table there); it runs before
    the manifest is written, so whatever it writes into the run directory is covered by it.
    """
    started = time.monotonic()
    fitted = fit_plan(plan, reporter=reporter)
    assert fitted.summary is not None  # no pause was asked for
    run_dir, data_dir = plan.run_dir, plan.data_dir
    fingerprint = modeldir.dataset_fingerprint(data_dir, [*plan.train_files, *plan.calibration_files])
    rel_calib = [relative_name(p, data_dir) for p in plan.calibration_files]
    metadata = modeldir.save_model(
        run_dir, fitted.detector, fitted.summary, fingerprint, extra={"calibration_files": rel_calib}
    )
    calibration = _calibrate_run(plan, fitted.detector, reporter, metadata["weights_sha256"])
    calibration.save(run_dir / modeldir.CALIBRATION_FILE)
    if metadata_fn is not None:
        write_json_atomic(run_dir / modeldir.METADATA_FILE, {**metadata, **metadata_fn(fitted.detector, calibration)})
    identity = modeldir.write_sums(run_dir, changed=modeldir.RUN_FILES)  # last: the model is complete now
    if mark_latest:
        modeldir.mark_latest(run_dir)
    (run_dir / modeldir.CHECKPOINT_FILE).unlink(missing_ok=True)
    summary = {**fitted.summary, "total_seconds": round(time.monotonic() - started, 2)}
    return TrainResult(run_dir, summary, calibration, identity.model_id)


@dataclass
class FittedDetector:
    """A detector after :func:`fit_plan`: trained to the end (``summary``) or paused (``summary`` None)."""

    detector: Detector
    summary: dict[str, Any] | None
    train_seconds: float  # training time so far, a resumed run's earlier time included
    paused_at: int | None = None  # the optimiser step training paused at
    planned_steps: int | None = None  # the schedule's steps (when paused)


def fit_plan(plan: TrainingPlan, *, reporter: Reporter, pause_at_step: int | None = None) -> FittedDetector:
    """Read the plan's training images and fit its detector, writing resumable checkpoints.

    With ``pause_at_step`` training stops after that many optimiser steps (a checkpoint of that
    step stays in the run directory, see :class:`TrainContext`) and the detector is returned as it
    is then, to be scored in memory; ``summary`` is None.
    """
    run_config, common, run_dir, data_dir = plan.run_config, plan.run_config.common, plan.run_dir, plan.data_dir
    device = prepare_device(run_config)
    reporter.info(
        "training ",
        (run_config.method, "bold"),
        f" (profile {run_config.profile}) on {device}: {plural(len(plan.train_files), 'training image')}, "
        f"{len(plan.calibration_files) or 'labelled folder for'} calibration; input {geometry_text(common)}; "
        f"run directory {run_dir}",
    )
    images, ok_paths, failures = _read_training_images(plan)
    if failures:
        if common.bad_images == "stop":
            path, reason = failures[0]
            raise DatasetError(
                f"cannot read training image {path}: {reason} ({len(failures)} unreadable in total); "
                "remove them or use --set common.bad_images=skip"
            )
        report_failures(reporter, failures, "training image")
    if images.shape[0] < 2:
        raise DatasetError(f"only {images.shape[0]} readable training image(s) in {data_dir}; at least 2 are needed")

    detector = _detector_class(run_config.method)(run_config, device)
    rel_train = [relative_name(p, data_dir) for p in plan.train_files]
    rel_calib = [relative_name(p, data_dir) for p in plan.calibration_files]

    def write_checkpoint(state: dict[str, Any]) -> None:
        modeldir.save_checkpoint(
            run_dir,
            modeldir.TrainCheckpoint(
                run_config.to_dict(),
                str(data_dir),
                rel_train,
                rel_calib,
                state,
                context.elapsed_s(),
                str(plan.calibration_dir) if plan.calibration_dir else None,
            ),
        )

    view = TrainProgressView(reporter)
    context = TrainContext(
        on_progress=view,
        on_checkpoint=write_checkpoint,
        checkpoint_every_s=common.checkpoint_every_s,
        resume_state=plan.resume_state,
        time_budget_s=common.time_budget_min * 60.0,
        elapsed_before_s=plan.seconds_before,
        pause_at_step=pause_at_step,
    )
    try:
        summary = detector.fit(images, context).to_dict()
    except TrainingPaused as paused:
        return FittedDetector(detector, None, context.elapsed_s(), paused.step, paused.total)
    finally:
        view.close()
    summary = {
        **summary,
        "image_colour": colour_mode(greyscale(images.numpy()).tolist()),
        **aspect_summary(plan.train_files),
        "n_train_images": len(ok_paths),
        "n_train_inputs": int(images.shape[0]),  # tiles with common.tiling, else images
        "n_unreadable_train_images": len(failures),
        "unreadable_train_images": [relative_name(p, data_dir) for p, _ in failures],
        "resumed": plan.resumed,
    }
    return FittedDetector(detector, summary, context.elapsed_s())


def _calibrate_run(plan: TrainingPlan, detector: Detector, reporter: Reporter, weights_sha256: str) -> Calibration:
    """Calibrate on the labelled calibration folder, or on the held-out good images."""
    if plan.calibration_dir is not None:
        good, defect = labelled_split(plan.calibration_dir)
        return calibrate_detector(
            detector,
            good,
            plan.calibration_dir,
            plan.run_config,
            reporter,
            defect,
            str(plan.calibration_dir),
            weights_sha256=weights_sha256,
        )
    return calibrate_detector(
        detector,
        plan.calibration_files,
        plan.data_dir,
        plan.run_config,
        reporter,
        source=f"{len(plan.calibration_files)} held-out images of {plan.data_dir}",
        weights_sha256=weights_sha256,
    )


def _read_training_images(plan: TrainingPlan) -> tuple[torch.Tensor, list[Path], list[tuple[Path, str]]]:
    """The training images resized to the input size, or (with tiling) tiles of them at their own scale."""
    common = plan.run_config.common
    if common.tiling.enabled:
        return load_training_tiles(plan.train_files, common.input_hw(), common.tiling, common.workers, common.seed)
    return load_training_images(plan.train_files, common.input_hw(), common.workers, common.batch_size)


def training_split(
    data_dir: Path,
    run_config: RunConfig,
    calibration_dir: Path | None,
    files: Sequence[Path] | None,
    reporter: Reporter,
) -> tuple[list[Path], list[Path]]:
    """Training and calibration files of a new run (a labelled ``data_dir`` is refused)."""
    if files is None:
        refuse_labelled_folder(data_dir, "train")
        files = find_images(data_dir, reporter)
    if not files:
        raise DatasetError(f"no images found in {data_dir}; point train at a folder of {supported_suffixes()} files")
    if calibration_dir is not None:
        return list(files), []
    return split_calibration(files, run_config, data_dir)


def prepare_run_dir(
    run_dir: Path | None, method: str, inputs: Sequence[Path], force: bool, reporter: Reporter
) -> tuple[Path, OutputLock]:
    """A new run directory under the runs folder, or ``run_dir`` checked by the output rules; locked.

    A folder that holds a model (or an interrupted run) is refused unless ``force``; with it,
    the old model's files are deleted first, so no mix of two models can remain. The lock comes
    first: a second ``train --out`` into a folder being trained into is refused as such, before it
    could take the first run's checkpoint for an interrupted run or delete it with ``--force``.
    """
    if run_dir is None:
        run_dir = modeldir.new_run_dir(method)
    lock = lock_output(run_dir, "--out", "run directory")
    try:
        modeldir.refuse_existing_run(run_dir, force)
        prepare_output_dir(run_dir, inputs, force=force)
        removed = modeldir.clear_model(run_dir) if force else []
    except BaseException:
        lock.release()
        raise
    if removed:
        names = ", ".join(p.relative_to(run_dir).as_posix() for p in removed)  # export-onnx/ files too
        reporter.warn(f"--force: replacing the model in {run_dir} (removed {names})")
    return run_dir, lock
