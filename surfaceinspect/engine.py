"""The workflows behind the CLI: train (with calibration and resume), score, heatmap, recalibrate.

Method-independent: detectors are reached only through the Detector interface and the registry.
"""

from __future__ import annotations

import errno
import heapq
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from surfaceinspect import modeldir, runtimes
from surfaceinspect.atomic import write_json_atomic
from surfaceinspect.calibration import Calibration, calibrate
from surfaceinspect.config import CommonConfig, RunConfig, list_profiles, resolve_keep_aspect, run_config_from_dict
from surfaceinspect.data import LoadedImage, iterate_images, load_training_images, stack_images
from surfaceinspect.datasets import find_labelled_layout, labelled_folder
from surfaceinspect.detectors import Detector, TrainContext, TrainingPaused, get_detector_class
from surfaceinspect.device import configure_threads, resolve_device
from surfaceinspect.drift import DEFAULT_WINDOW, DriftMonitor
from surfaceinspect.errors import (
    EXIT_DEFECT,
    EXIT_OK,
    EXIT_UNREADABLE,
    ConfigError,
    DatasetError,
    ModelDirError,
)
from surfaceinspect.imageio import (
    discover_images,
    greyscale,
    image_size,
    read_image,
    resize_image,
    supported_suffixes,
)
from surfaceinspect.outputs import OutputLock, lock_output, prepare_output_dir
from surfaceinspect.records import ScoreRecord, format_score, utc_now
from surfaceinspect.regions import find_regions
from surfaceinspect.sharding import Shard
from surfaceinspect.tiling import TiledPredictor, load_training_tiles
from surfaceinspect.ui import Reporter, TrainProgressView, plural

MAX_LISTED_FAILURES = 10


# ---------------------------------------------------------------------------------------------
# Helpers


def require_input(path: Path) -> Path:
    """Fail early (before loading a model) when the image file or folder does not exist (links named as such)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            what = "is a symbolic link loop (it leads back to itself)"
        elif path.is_symlink():
            what = "is a broken symbolic link (its target does not exist)"
        else:
            what = "does not exist"
        raise DatasetError(f"{path} {what}; give an image file or a folder of images") from None
    return path


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or its name when ``root`` is the file itself."""
    try:
        rel = path.relative_to(root)
        return rel.as_posix() if str(rel) != "." else path.name
    except ValueError:
        return path.name


def split_calibration(
    files: Sequence[Path], run_config: RunConfig, folder: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """Deterministically hold out ``max(min_images, fraction * N)`` files for calibration.

    Too few files is refused with the fix first: more good images. The minimum is a safety
    setting (fewer calibration images cannot guarantee the false-reject rate), so lowering it is
    only named as what decides the number, not offered as the way out.
    """
    cal = run_config.common.calibration
    n = len(files)
    n_cal = max(cal.min_images, round(cal.fraction * n))
    if n - n_cal < 2:
        where = f"{folder}: " if folder is not None else ""
        raise DatasetError(
            f"{where}{plural(n, 'good image')}, but training needs at least {n_cal + 2}: {n_cal} held out to set "
            f"the threshold and 2 or more to learn from; add images of defect-free parts (how many are held out "
            f"is set by common.calibration.min_images and fraction)"
        )
    order = np.random.default_rng(run_config.common.seed).permutation(n)
    cal_idx = set(order[:n_cal].tolist())
    train = [f for i, f in enumerate(files) if i not in cal_idx]
    calib = [f for i, f in enumerate(files) if i in cal_idx]
    return train, calib


def find_images(root: Path, reporter: Reporter) -> list[Path]:
    """The input images under ``root`` (see ``discover_images``); says which output folders and files it skips.

    Files that are not images (``report.pdf``) are named in a warning: a part whose picture was
    saved in a format that is not read would otherwise go uninspected without a word.
    """
    skipped: list[Path] = []
    found_others: list[Path] = []
    paths = discover_images(root, skipped=skipped, others=found_others)
    if skipped:
        reporter.info(f"skipping output folder(s) of surfaceinspect inside the input: {_listed(skipped)}")
    # records files (this run's own FILE.part among them) are no pictures anyone expects to be scored
    others = [p for p in found_others if p.suffix.lower() not in _RECORDS_SUFFIXES]
    if others:
        reporter.warn(
            f"{plural(len(others), 'file')} skipped, not in an image format that is read "
            f"({supported_suffixes()}): {_listed(others)}"
        )
    return paths


_RECORDS_SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson", ".json", ".part"})


def _listed(paths: Sequence[Path]) -> str:
    """The first :data:`MAX_LISTED_FAILURES` paths, and how many more."""
    names = ", ".join(str(p) for p in paths[:MAX_LISTED_FAILURES])
    return names + (f" and {len(paths) - MAX_LISTED_FAILURES} more" if len(paths) > MAX_LISTED_FAILURES else "")


def refuse_labelled_folder(folder: Path, command: str) -> None:
    """Refuse to treat a labelled folder (MVTec root, or good/ + defect subfolders) as all-good images.

    ``command`` is ``train`` or ``recalibrate``; the message says what to run instead.
    """
    layout = find_labelled_layout(folder)
    if layout is None:
        return
    if layout.mvtec_root:
        what = f"{folder} is a dataset in MVTec layout (train/good, test/...)"
    else:
        what = f"{folder} is a labelled folder (good/ plus defect folders: {', '.join(layout.defect_types)})"
    labelled = layout.root / "test" if layout.mvtec_root else layout.root
    if command == "train":
        fix = f"train on {layout.good_dir} (add --calibration-dir {labelled} to calibrate on the labelled images)"
    else:
        fix = f"recalibrate on {layout.good_dir}, or on {labelled} --labelled --mode f1|recall"
    raise DatasetError(f"{what}; its defects would be taken for good images: {fix}")


def _report_failures(reporter: Reporter, failures: list[tuple[Path, str]], what: str) -> None:
    for path, reason in failures[:MAX_LISTED_FAILURES]:
        reporter.warn(f"skipped unreadable {what} {path}: {reason}")
    if len(failures) > MAX_LISTED_FAILURES:
        reporter.warn(f"... and {len(failures) - MAX_LISTED_FAILURES} more unreadable {what}s")


def colour_mode(grey_flags: Sequence[bool]) -> str:
    """``grey``, ``colour`` or ``mixed`` for a set of images' greyscale flags."""
    n_grey = sum(bool(g) for g in grey_flags)
    return "grey" if n_grey == len(grey_flags) else "colour" if n_grey == 0 else "mixed"


class ImageCheck:
    """Finds the images unlike the training images in one respect: a note in each one's record, one warning for all."""

    def __init__(self) -> None:
        self.count = 0
        self.names: list[str] = []

    def differs(self, item: LoadedImage) -> bool:
        raise NotImplementedError

    def note(self, item: LoadedImage) -> str:
        """The record's warning for one such image (short: it is repeated in every record)."""
        raise NotImplementedError

    def message(self, names: str) -> str:
        raise NotImplementedError

    def see(self, item: LoadedImage, name: str) -> str | None:
        """Count the image if it differs; returns its record's warning (None if it does not)."""
        if item.image is None or not self.differs(item):
            return None
        self.count += 1
        if len(self.names) < MAX_LISTED_FAILURES:
            self.names.append(name)
        return self.note(item)

    def report(self, reporter: Reporter) -> None:
        if self.count:
            more = f" and {self.count - len(self.names)} more" if self.count > len(self.names) else ""
            reporter.warn(self.message(", ".join(self.names) + more))


class ColourCheck(ImageCheck):
    """Images whose colour mode differs from the training images' (grey vs colour).

    A model trained on colour images sees a greyscale image as far from everything it learned
    (and the reverse), so its score says little.
    """

    def __init__(self, trained_on: str | None) -> None:
        super().__init__()
        self.trained_on = trained_on if trained_on in ("grey", "colour") else None

    def differs(self, item: LoadedImage) -> bool:
        return self.trained_on is not None and item.grey != (self.trained_on == "grey")

    def note(self, item: LoadedImage) -> str:
        other = "colour" if self.trained_on == "grey" else "greyscale"
        return f"{other} image, model trained on {self.trained_on} images: score not reliable"

    def message(self, names: str) -> str:
        other = "colour" if self.trained_on == "grey" else "greyscale"
        return (
            f"{self.count} image(s) are {other} but the model was trained on {self.trained_on} images "
            f"({names}); their scores are not reliable: use the camera setting "
            "of the training images, or train a model on such images"
        )


class AspectCheck(ImageCheck):
    """Images whose aspect ratio lies outside the training images' (squashed differently, so scored unreliably).

    Training images vary (MTD's span 0.36-2.6), and the model has seen every aspect in that range,
    so the check is against the range (stored at training), widened by :data:`ASPECT_RANGE_MARGIN`;
    a model of an older version stored only the median, checked with :data:`ASPECT_TOLERANCE`.
    Tiled models see every image at its own scale, so the aspect does not matter to them.
    """

    def __init__(self, training: dict[str, Any], tiled: bool) -> None:
        super().__init__()
        self.allowed: tuple[float, float] | None = None
        self.trained = ""
        span, median = training.get("image_aspect_range"), training.get("image_aspect")
        if tiled:
            return
        if isinstance(span, list) and len(span) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in span):
            low, high = float(min(span)), float(max(span))
            self.allowed = (low / ASPECT_RANGE_MARGIN, high * ASPECT_RANGE_MARGIN)
            self.trained = f"{low:.3g}-{high:.3g}"
        elif isinstance(median, (int, float)) and median > 0:
            self.allowed = (median / ASPECT_TOLERANCE, median * ASPECT_TOLERANCE)
            self.trained = f"{median:.3g}"

    def differs(self, item: LoadedImage) -> bool:
        height, width = item.original_size
        if self.allowed is None or not height or not width:
            return False
        return not self.allowed[0] <= width / height <= self.allowed[1]

    def note(self, item: LoadedImage) -> str:
        height, width = item.original_size
        return (
            f"aspect {width / height:.3g} (width/height) outside the training images' {self.trained}: "
            "distorted unlike them, score not reliable"
        )

    def message(self, names: str) -> str:
        return (
            f"{self.count} image(s) have an aspect ratio (width/height) far outside the training images' "
            f"{self.trained} ({names}); resized to the model's input they are distorted unlike the "
            "training images, so their scores are not reliable (each record says so in its warnings): crop "
            "them like the training images, or train with --image-size keep:L or tiling (common.tiling.enabled)"
        )


def reliability_checks(metadata: dict[str, Any], run_config: RunConfig) -> list[ImageCheck]:
    """The checks of scored images against the model's training images (colour mode, aspect)."""
    training = metadata.get("training", {})
    return [
        ColourCheck(training.get("image_colour")),
        AspectCheck(training, run_config.common.tiling.enabled),
    ]


def _prepare(run_config: RunConfig) -> torch.device:
    configure_threads(run_config.common.threads)
    torch.manual_seed(run_config.common.seed)
    return resolve_device(run_config.common.device)


# ---------------------------------------------------------------------------------------------
# Inference core shared by score, heatmap, calibration and benchmark


@dataclass
class ImageResult:
    """One image after inference: its record, its map at the file's resolution, the loaded item."""

    item: LoadedImage
    record: ScoreRecord
    anomaly_map: np.ndarray | None  # float32 (H, W), raw units (same as the score)


def predict_items(
    detector: Detector, tiler: TiledPredictor | None, items: list[LoadedImage]
) -> list[tuple[float, np.ndarray]]:
    """(score, map) per readable item: one batched forward pass, or tile by tile at the image's resolution."""
    if not items:
        return []
    if tiler is not None:
        return [tiler.predict(item.image) for item in items if item.image is not None]
    prediction = detector.predict(stack_images(items))
    maps = prediction.maps.numpy().astype(np.float32, copy=False)
    return [(float(score), maps[i]) for i, score in enumerate(prediction.scores.tolist())]


def run_inference(
    paths: Sequence[Path],
    root: Path,
    detector: Detector,
    calibration: Calibration | None,
    *,
    batch_size: int,
    workers: int,
    keep_original: bool = False,
    full_resolution_maps: bool = True,
    model_id: str | None = None,
    runtime: str | None = None,
    checks: Sequence[ImageCheck] = (),
) -> Iterator[ImageResult]:
    """Score ``paths`` in batches; yield one ImageResult per file, in order, errors included.

    With a calibration, records carry the verdict, normalised score, threshold and defect regions
    (at the pixel threshold, on the map resized to the file's own resolution). Every record carries
    ``model_id``, ``runtime`` and the time; ``checks`` (see :func:`reliability_checks`) add their
    notes to the ``warnings`` of the images they concern.
    """
    tiled = detector.run_config.common.tiling.enabled
    # Tiling reads each image at its own resolution, one at a time (a 16000 x 2048 strip is 400 MB
    # as float); the tiles are batched inside the TiledPredictor instead.
    batches = iterate_images(
        paths, detector.input_size, 1 if tiled else batch_size, workers, keep_original, resize=not tiled
    )
    tiler = TiledPredictor(detector, detector.run_config.common.tiling, batch_size) if tiled else None
    threshold = calibration.image_threshold if calibration is not None else None
    for batch in batches:
        readable = [item for item in batch if item.image is not None]
        predictions = predict_items(detector, tiler, readable)
        position = 0
        for item in batch:
            record = ScoreRecord(
                path=relative_name(item.path, root), verdict="error", model_id=model_id, threshold=threshold,
                runtime=runtime, time=utc_now(),
            )  # fmt: skip
            if item.image is None:
                record.error = item.error
                yield ImageResult(item, record, None)
                continue
            score, small_map = predictions[position]
            position += 1
            height, width = item.original_size
            full_map = (
                cv2.resize(small_map, (width, height), interpolation=cv2.INTER_LINEAR)
                if full_resolution_maps and (height, width) != small_map.shape
                else small_map
            )
            record.verdict, record.score, record.width, record.height = "good", score, width, height
            record.warnings = [note for check in checks if (note := check.see(item, record.path)) is not None]
            if not math.isfinite(score):
                record.verdict = "error"
                record.error = "the model produced a non-finite score for this image"
            elif calibration is not None:
                _judge(record, full_map, calibration)
            yield ImageResult(item, record, full_map)


def _judge(record: ScoreRecord, full_map: np.ndarray, calibration: Calibration) -> None:
    """Verdict, normalised score and (for a defect) its regions at the pixel threshold, into ``record``."""
    score = float(record.score)  # type: ignore[arg-type]
    record.score_normalized = float(calibration.normalize(score))
    defect = calibration.is_defect(score)
    record.verdict = "defect" if defect else "good"
    regions = find_regions(full_map, calibration.pixel_threshold) if defect else []
    record.n_regions = len(regions)
    if regions:
        largest = regions[0]
        record.largest_region_area = int(largest.area)
        record.bbox_x, record.bbox_y, record.bbox_width, record.bbox_height = (int(v) for v in largest.bbox)


# ---------------------------------------------------------------------------------------------
# Calibration


def calibrate_detector(
    detector: Detector,
    good_paths: Sequence[Path],
    root: Path,
    run_config: RunConfig,
    reporter: Reporter,
    defect_paths: Sequence[Path] = (),
    source: str = "",
    trained_colour: str | None = None,
    weights_sha256: str | None = None,
) -> Calibration:
    """Score calibration images and build the Calibration (mode and targets from the config).

    ``trained_colour`` (``grey``/``colour``, from the training summary) warns about good images
    of the other colour mode; ``weights_sha256`` binds the calibration to the model's weights.
    """
    common = run_config.common
    settings = common.calibration
    good_scores: list[float] = []
    maxima: list[float] = []
    medians: list[float] = []
    defect_scores: list[float] = []
    failures: list[tuple[Path, str]] = []
    all_paths = list(good_paths) + list(defect_paths)
    n_good = len(good_paths)
    colours = ColourCheck(trained_colour)
    with reporter.progress("calibrate", len(all_paths)) as bar:
        for i, result in enumerate(
            run_inference(
                all_paths,
                root,
                detector,
                None,
                batch_size=common.batch_size,
                workers=common.workers,
                full_resolution_maps=False,
            )
        ):
            bar.update(advance=1)
            if result.record.verdict == "error" or result.anomaly_map is None:
                failures.append((result.item.path, result.record.error or "unreadable"))
                continue
            if i < n_good:
                colours.see(result.item, result.record.path)
                good_scores.append(float(result.record.score))
                maxima.append(float(result.anomaly_map.max()))
                medians.append(float(np.median(result.anomaly_map)))
            else:
                defect_scores.append(float(result.record.score))
    _report_failures(reporter, failures, "calibration image")
    colours.report(reporter)
    if not good_scores:
        raise DatasetError("no readable good image for calibration; check the calibration folder")
    calibration = calibrate(
        detector.name,
        np.array(good_scores),
        np.array(maxima),
        np.array(medians),
        false_reject_rate=settings.false_reject_rate,
        mode=settings.mode,
        target_recall=settings.target_recall,
        defect_scores=np.array(defect_scores) if defect_scores else None,
        source=source,
        weights_sha256=weights_sha256,
        estimator=settings.estimator,
    )
    for note in calibration.notes:
        reporter.warn(note)
    return calibration


def labelled_split(calibration_dir: Path) -> tuple[list[Path], list[Path]]:
    samples = labelled_folder(calibration_dir)
    good = [s.path for s in samples if not s.is_anomalous]
    defect = [s.path for s in samples if s.is_anomalous]
    return good, defect


# ---------------------------------------------------------------------------------------------
# Train


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
    is then refused). ``run_dir`` follows the output rules (:mod:`surfaceinspect.outputs`); a
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
    device = _prepare(run_config)
    reporter.info(
        "training ",
        (run_config.method, "bold"),
        f" (profile {run_config.profile}) on {device}: {plural(len(plan.train_files), 'training image')}, "
        f"{len(plan.calibration_files) or 'labelled folder for'} calibration; input {_geometry_text(common)}; "
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
        _report_failures(reporter, failures, "training image")
    if images.shape[0] < 2:
        raise DatasetError(f"only {images.shape[0]} readable training image(s) in {data_dir}; at least 2 are needed")

    detector = get_detector_class(run_config.method)(run_config, device)
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
        "image_colour": colour_mode(greyscale(images).tolist()),
        **_aspect_summary(plan.train_files),
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


# ---------------------------------------------------------------------------------------------
# Geometry

# Aspect ratios (width / height) are estimated from this many images' headers, spread over the set.
_ASPECT_SAMPLE = 200
# Scoring an image whose aspect is this factor outside the training images' range warns (their range
# comes from a sample of the headers, so its ends are widened a little).
ASPECT_RANGE_MARGIN = 1.25
# Models of older versions stored only the median aspect: the warning then fires beyond this factor.
ASPECT_TOLERANCE = 1.5


def _spread_sample(paths: Sequence[Path], n: int) -> list[Path]:
    """Every k-th of ``paths`` (k = len // n, at least 1): about n to 2n files spread over the whole folder."""
    return list(paths)[:: max(1, len(paths) // n)]


def _header_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """(height, width) of (a sample of) ``paths`` from their headers; unreadable files are left out."""
    sizes = []
    for path in _spread_sample(paths, _ASPECT_SAMPLE):
        try:
            height, width = image_size(path)
        except Exception:  # noqa: BLE001 - unreadable files are reported when the images are read
            continue
        if height > 0 and width > 0:
            sizes.append((height, width))
    return sizes


def median_aspect(paths: Sequence[Path]) -> float | None:
    """Median width / height of (a sample of) ``paths`` from their headers; None if none is readable."""
    aspects = [width / height for height, width in _header_sizes(paths)]
    return round(float(np.median(aspects)), 4) if aspects else None


def _aspect_summary(paths: Sequence[Path]) -> dict[str, Any]:
    """The training summary's aspects (width / height, from a sample of the headers): median and [lowest, highest]."""
    aspects = [width / height for height, width in _header_sizes(paths)]
    if not aspects:
        return {"image_aspect": None, "image_aspect_range": None}
    return {
        "image_aspect": round(float(np.median(aspects)), 4),
        "image_aspect_range": [round(min(aspects), 4), round(max(aspects), 4)],
    }


# The `cpu` profiles shrink images; from this factor on, train may name the `texture` profile.
_SHRINK_HINT_FACTOR = 2.0
# ... but only for images that look like a texture: below this share of structure common to all
# images (shared_structure as train measures it: DAGM Class 1 0.15, MTD 0.34, MVTec bottle 0.99;
# BENCHMARKS.md section 9, session 11).
_TEXTURE_STRUCTURE = 0.25
_STRUCTURE_SAMPLE = 32  # images read to measure it
_STRUCTURE_SIDE = 64  # pixels: the structure that matters here is the layout, not the fine texture


def shared_structure(
    paths: Sequence[Path], sample: int = _STRUCTURE_SAMPLE, side: int = _STRUCTURE_SIDE
) -> float | None:
    """Share of the images' pixel variation that is the same in every image: 0 = texture, 1 = one object.

    Each image (of an even sample of ``paths``) is shrunk to ``side`` x ``side`` grey and
    standardised; the spatial variance of their pixel-wise mean is that share, corrected for the
    1/n that independent images leave. Aligned objects (a bottle from above) give about 1; a
    texture whose pattern falls anywhere gives about 0, plus whatever lighting all images share.
    None when fewer than 4 images are readable (too few to tell).
    """
    rows = []
    for path in _spread_sample(paths, sample)[:sample]:
        try:
            grey = resize_image(read_image(path), side).mean(dim=0)
        except Exception:  # noqa: BLE001 - unreadable files are reported when the images are read
            continue
        spread = grey.std()
        if float(spread) > 1e-6:  # a flat image has no pattern to compare
            rows.append((grey - grey.mean()) / spread)
    n = len(rows)
    if n < 4:
        return None
    common = float(torch.stack(rows).mean(dim=0).var(correction=0))
    return min(1.0, max(0.0, (common - 1.0 / n) / (1.0 - 1.0 / n)))


def suggest_profile(run_config: RunConfig, train_files: Sequence[Path], reporter: Reporter) -> str | None:
    """Name the ``texture`` profile when a ``cpu`` profile shrinks texture-like training images 2x or more.

    Defects of a few percent of the image and fine textures fade when the image is shrunk
    (BENCHMARKS.md sections 7 and 9); the ``texture`` profiles keep more pixels. On whole objects
    and surfaces with a common layout (MVTec bottle, MTD) they scored lower, so the hint is given
    only when :func:`shared_structure` says the images look like a texture. Returns the hint.
    """
    common = run_config.common
    if run_config.profile != "cpu" or common.tiling.enabled:
        return None
    if f"{run_config.method}-texture" not in list_profiles():
        return None
    sizes = _header_sizes(train_files)
    if not sizes:
        return None
    height, width = (int(v) for v in np.median(np.array(sizes), axis=0))
    input_h, input_w = common.input_hw()
    factor = min(height / input_h, width / input_w)
    if factor < _SHRINK_HINT_FACTOR:
        return None
    structure = shared_structure(train_files)
    if structure is not None and structure >= _TEXTURE_STRUCTURE:
        return None
    looks = "look like a texture and " if structure is not None else ""
    hint = (
        f"the training images (median {height}x{width}) {looks}are shrunk {factor:.3g}x to "
        f"{input_h}x{input_w}: on fine textures or defects of a few percent of the image, --profile texture keeps "
        "more detail (slower; README 'Choosing a profile')"
    )
    reporter.info(hint)
    return hint


def resolve_geometry(run_config: RunConfig, train_files: Sequence[Path], reporter: Reporter) -> None:
    """Resolve ``common.image_size: keep:L`` from the training images' median aspect (in place)."""
    common = run_config.common
    if not common.keeps_aspect:
        return
    aspect = median_aspect(train_files)
    if aspect is None:
        raise DatasetError("common.image_size keep:L needs readable training images to measure their aspect")
    requested = common.image_size
    resolve_keep_aspect(common, aspect, run_config.method_config.size_multiple())
    run_config.validate()
    height, width = common.input_hw()
    reporter.info(f"image size {requested}: {height}x{width} (H x W), the training images' median aspect {aspect:.3g}")


def _geometry_text(common: CommonConfig) -> str:
    height, width = common.input_hw()
    if common.tiling.enabled:
        scale = f", images scaled by {common.tiling.scale:g}" if common.tiling.scale != 1.0 else ""
        return f"tiles of {height}x{width} (H x W), overlap {common.tiling.overlap:g}{scale}"
    return f"{height}x{width} (H x W)"


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
        reporter.warn(f"--force: replacing the model in {run_dir} (removed {', '.join(p.name for p in removed)})")
    return run_dir, lock


# ---------------------------------------------------------------------------------------------
# Load, recalibrate


@dataclass
class LoadedModel:
    run_dir: Path
    detector: Detector
    calibration: Calibration  # None only from ``load(..., need_calibration=False)`` (recalibrate)
    metadata: dict[str, Any]
    model_id: str = ""  # first 12 hex of the SHA-256 of the model's manifest (see modeldir.verify_sums)
    runtime: str = "torch"  # what scores: torch, onnx or openvino
    notes: list[str] = field(default_factory=list)  # what the operator should know (an older model folder)


def load(
    model_dir: str | Path | None,
    device: str = "auto",
    threads: int = 0,
    inference_sets: Sequence[str] = (),
    runtime: str | None = None,
    *,
    need_calibration: bool = True,
) -> LoadedModel:
    """Load a finished run (``None`` = the latest) with its calibration, checked as a whole.

    ``inference_sets`` override inference settings (see ``config.with_inference_overrides``); the
    stored calibration then no longer matches the scores, so callers recalibrate. ``runtime``
    ``onnx`` (or ``model_dir`` being an export folder) scores with the run's exported graph
    instead of torch (see :mod:`surfaceinspect.runtimes`); every later step is the same. ``None``
    or ``auto``: see :func:`surfaceinspect.runtimes.auto_runtime`.

    The calibration must be the model's own (:meth:`Calibration.check_model`), and every file that
    affects a verdict must match the folder's manifest (:func:`modeldir.verify_sums`); both are read
    once here, never per image. ``need_calibration=False`` (recalibrate, which replaces it) loads
    a model whose calibration is missing, damaged or another model's, with ``calibration`` None.
    """
    run_dir = modeldir.resolve_model_dir(model_dir)
    configure_threads(threads)
    torch_device = None  # resolved only where torch may score: --runtime onnx ignores --device
    if runtime in (None, "auto"):
        torch_device = resolve_device(device)
        runtime = runtimes.auto_runtime(run_dir, torch_device.type == "cpu", inference_sets)
    if runtime != "torch" or runtimes.is_export_dir(run_dir):
        detector, metadata = runtimes.load_exported(run_dir, runtime, threads, inference_sets)
        runtime = detector.runtime
    else:
        detector, metadata = modeldir.load_model(run_dir, torch_device or resolve_device(device), inference_sets)
    notes: list[str] = []
    calibration = _load_calibration(run_dir, metadata, notes, required=need_calibration)
    identity = modeldir.verify_sums(
        run_dir,
        expected=metadata.get("manifest") == modeldir.SUMS_FILE,
        skip=() if need_calibration else (modeldir.CALIBRATION_FILE,),
    )
    notes = identity.notes + notes
    return LoadedModel(run_dir, detector, calibration, metadata, identity.model_id, str(runtime), notes)


def _load_calibration(run_dir: Path, metadata: dict[str, Any], notes: list[str], required: bool) -> Calibration | None:
    """The calibration of ``run_dir``, refused if it belongs to another model (None if not ``required``)."""
    path = run_dir / modeldir.CALIBRATION_FILE
    try:
        calibration = Calibration.load(path)
        notes += calibration.check_model(path, str(metadata.get("method")), metadata.get("weights_sha256"))
    except ModelDirError:
        if required:
            raise
        return None
    return calibration


@dataclass
class Recalibration:
    """What ``recalibrate`` changed: the calibration before and after, and where the old one is kept."""

    previous: Calibration | None  # None: the replaced file could not be read (undo of a damaged file)
    calibration: Calibration
    backup: Path | None
    model_id: str = ""  # the model id after the change (the calibration is part of it)


def recalibrate(
    model: LoadedModel,
    folder: Path,
    *,
    labelled: bool,
    mode: str | None = None,
    false_reject_rate: float | None = None,
    target_recall: float | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    reporter: Reporter | None = None,
    force: bool = False,
) -> Recalibration:
    """Recompute the calibration of a trained model from a new folder, without retraining.

    Refuses what would quietly make the model pass defects: fewer good images than training
    needs for calibration (``common.calibration.min_images``), a labelled folder taken as all
    good, and (unless ``force``) "good" images whose median scores at or above the current
    threshold: defective images given as good look like that, and a script never sees a warning.
    The previous ``calibration.json`` is kept as ``calibration.<UTC time>.json`` (see
    :func:`undo_recalibration`); the manifest is rewritten (the model id changes with the thresholds).
    """
    reporter = reporter or Reporter(quiet=True)
    run_config = model.detector.run_config
    settings = run_config.common.calibration
    if mode is not None:
        settings.mode = mode
    if false_reject_rate is not None:
        settings.false_reject_rate = false_reject_rate
    if target_recall is not None:
        settings.target_recall = target_recall
    settings.validate()
    if batch_size is not None:
        run_config.common.batch_size = batch_size
    if workers is not None:
        run_config.common.workers = workers
    if labelled:
        good, defect = labelled_split(folder)
    else:
        if settings.mode != "quantile":
            raise ConfigError(f"mode {settings.mode} needs --labelled and a folder with good/ and defect subfolders")
        refuse_labelled_folder(folder, "recalibrate")
        good, defect = find_images(folder, reporter), []
    _require_calibration_images(len(good), settings.min_images, folder, readable=False)
    calibration = calibrate_detector(
        model.detector,
        good,
        folder,
        run_config,
        reporter,
        defect,
        str(folder),
        trained_colour=model.metadata.get("training", {}).get("image_colour"),
        weights_sha256=model.metadata.get("weights_sha256"),
    )
    _require_calibration_images(calibration.n_good, settings.min_images, folder, readable=True)
    previous = model.calibration
    if previous is not None and calibration.good_score_stats["median"] >= previous.image_threshold and not force:
        raise DatasetError(
            f"most of the {calibration.n_good} new good images score at or above the current image threshold "
            f"(median {calibration.good_score_stats['median']:.5g} >= {previous.image_threshold:.5g}): {folder} looks "
            "like defective images, and thresholds made from them would pass similar defects; nothing was changed. "
            "If the line really changed (lighting, camera), pass --force"
        )
    backup = modeldir.backup_calibration(model.run_dir)
    calibration.save(model.run_dir / modeldir.CALIBRATION_FILE)
    identity = modeldir.write_sums(model.run_dir, changed=[modeldir.CALIBRATION_FILE])
    model.calibration, model.model_id = calibration, identity.model_id
    if previous is not None:
        _warn_if_unlike(previous, calibration, folder, model.run_dir, reporter)
    return Recalibration(previous, calibration, backup, identity.model_id)


def _require_calibration_images(n: int, minimum: int, folder: Path, readable: bool) -> None:
    if n < minimum:
        raise DatasetError(
            f"{folder}: {n} good image(s){' could be read' if readable else ''}, but calibration needs at least "
            f"{minimum} (common.calibration.min_images, as in train); add images of defect-free parts"
        )


def _warn_if_unlike(previous: Calibration, new: Calibration, folder: Path, run_dir: Path, reporter: Reporter) -> None:
    """Warn when the new good scores look unlike good images of the previous calibration.

    The previous threshold leaves about ``false_reject_rate`` (1 %) of good images above it; when
    the new "good" images put their 95th percentile (or even their median: only with ``--force``)
    above it, the folder probably holds defects (or the line really changed): similar defects would
    now pass.
    """
    stats, threshold = new.good_score_stats, previous.image_threshold
    if stats["median"] >= threshold:
        share = f"most of the new good images score above the previous threshold (median {stats['median']:.5g}"
    elif stats["p95"] >= threshold:
        share = f"over 5% of the new good images score above the previous threshold (95th percentile {stats['p95']:.5g}"
    else:
        return
    reporter.warn(
        f"{share} >= {threshold:.5g}): if {folder} holds defective images, similar defects now pass. Check the "
        f"folder; `surfaceinspect recalibrate --undo --model {run_dir}` restores the previous calibration"
    )


def _binding(model_dir: Path) -> dict[str, Any]:
    """What a calibration of ``model_dir`` is checked against: method, weights, whether it has a manifest."""
    if runtimes.is_export_dir(model_dir):
        manifest = runtimes.read_manifest(model_dir)
        return {
            "method": manifest.get("method"),
            "weights_sha256": manifest.get("source_weights_sha256"),
            "manifest": manifest.get("manifest"),
        }
    return modeldir.read_metadata(model_dir)


def undo_recalibration(model_dir: str | Path | None) -> Recalibration:
    """Restore the newest kept calibration of a run (``recalibrate --undo``).

    The restored file is checked (valid, and made for this model) and the rest of the folder
    against its manifest before it replaces ``calibration.json``; the calibration it replaces is
    dropped (it came from ``recalibrate``, which can be run again), even when it is damaged: undo is
    the way back from a bad calibration file.
    """
    run_dir = modeldir.resolve_model_dir(model_dir)
    backup = modeldir.newest_calibration_backup(run_dir)
    restored = Calibration.load(backup)
    binding = _binding(run_dir)
    restored.check_model(backup, str(binding.get("method")), binding.get("weights_sha256"))
    expected = binding.get("manifest") == modeldir.SUMS_FILE
    modeldir.verify_sums(run_dir, expected=expected, skip=[modeldir.CALIBRATION_FILE])
    try:
        current: Calibration | None = Calibration.load(run_dir / modeldir.CALIBRATION_FILE)
    except ModelDirError:
        current = None
    modeldir.restore_calibration(run_dir, backup)
    identity = modeldir.write_sums(run_dir, changed=[modeldir.CALIBRATION_FILE])
    return Recalibration(current, restored, backup, identity.model_id)


# ---------------------------------------------------------------------------------------------
# Score


@dataclass
class ScoreSummary:
    n_good: int = 0
    n_defect: int = 0
    n_error: int = 0
    seconds: float = 0.0
    worst: list[tuple[float, str, str]] = field(default_factory=list)  # (score, path, verdict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # the first (path, reason) pairs
    drift: DriftMonitor | None = None  # the drift checks of this run (None: not monitored)

    @property
    def total(self) -> int:
        return self.n_good + self.n_defect + self.n_error

    def add(self, record: ScoreRecord) -> None:
        """Count one record (keeps the first unreadable files; ``worst`` is left to the caller)."""
        if record.verdict == "error":
            self.n_error += 1
            if len(self.unreadable) < MAX_LISTED_FAILURES:
                self.unreadable.append((record.path, record.error or "unreadable"))
        elif record.verdict == "defect":
            self.n_defect += 1
        else:
            self.n_good += 1

    def exit_code(self, fail_on_defect: bool = True) -> int:
        """1 if any defect (unless not ``fail_on_defect``), else 3 if any unreadable, else 0."""
        if self.n_defect and fail_on_defect:
            return EXIT_DEFECT
        if self.n_error:
            return EXIT_UNREADABLE
        return EXIT_OK


def drift_monitor(model: LoadedModel, window: int = DEFAULT_WINDOW) -> DriftMonitor:
    """The drift monitor of a loaded model: its good calibration scores are the reference."""
    return DriftMonitor(model.calibration.good_scores, model.calibration.image_threshold, window)


def score_folder(
    model: LoadedModel,
    images_dir: Path,
    *,
    on_result: Callable[[ImageResult], None],
    batch_size: int | None = None,
    workers: int | None = None,
    keep_original: bool = False,
    reporter: Reporter | None = None,
    n_worst: int = 10,
    label: str = "score",
    shard: Shard | None = None,
    drift_window: int = DEFAULT_WINDOW,
) -> ScoreSummary:
    """Score every image under ``images_dir`` (recursive), calling ``on_result`` as each is done.

    Memory stays flat: nothing per image is kept beyond the ``n_worst`` highest scores and the
    first unreadable files. Images unlike the training images (another colour mode, an aspect
    outside theirs) get a note in their record's ``warnings`` and are named in one warning at the
    end. Each ``drift_window`` good verdicts are checked for drift (:mod:`surfaceinspect.drift`).
    With ``shard`` only the images of that shard are scored (see :mod:`surfaceinspect.sharding`);
    a shard may be empty.
    """
    reporter = reporter or Reporter(quiet=True)
    paths = find_images(images_dir, reporter)
    if not paths:
        raise DatasetError(f"no images found in {images_dir}; expected {supported_suffixes()} files")
    root = images_dir if images_dir.is_dir() else images_dir.parent
    if shard is not None:
        n_found = len(paths)
        paths = shard.select(paths, root)
        reporter.info(shard.describe(len(paths), n_found))
    common = model.detector.run_config.common
    summary = ScoreSummary()
    summary.drift = drift = drift_monitor(model, drift_window)
    worst: list[tuple[float, str, str]] = []
    checks = reliability_checks(model.metadata, model.detector.run_config)
    started = time.monotonic()
    with reporter.progress(label, len(paths)) as bar:
        for result in run_inference(
            paths,
            root,
            model.detector,
            model.calibration,
            batch_size=batch_size or common.batch_size,
            workers=common.workers if workers is None else workers,
            keep_original=keep_original,
            model_id=model.model_id,
            runtime=model.runtime,
            checks=checks,
        ):
            record = result.record
            summary.add(record)
            drift.track(record, reporter)
            if record.score is not None and math.isfinite(record.score):
                entry = (record.score, record.path, record.verdict)
                if len(worst) < n_worst:
                    heapq.heappush(worst, entry)
                else:
                    heapq.heappushpop(worst, entry)
            on_result(result)
            bar.update(advance=1, extra=f"{summary.n_defect} defect, {summary.n_error} unreadable")
    for check in checks:
        check.report(reporter)
    summary.worst = sorted(worst, reverse=True)
    summary.seconds = time.monotonic() - started
    return summary


# ---------------------------------------------------------------------------------------------
# Heatmap


def _output_stem(record_path: str, used: set[str]) -> str:
    """``a/b.png`` -> ``a/b``; if two inputs share a stem (b.png, b.jpg) keep the suffix for the later ones."""
    stem = Path(record_path).with_suffix("").as_posix()
    if stem in used:
        stem = record_path
    used.add(stem)
    return stem


def _gallery_context(model: LoadedModel, images_dir: Path) -> dict[str, str]:
    """What the operator needs to read index.html: which model, which thresholds, which images."""
    cal = model.calibration
    selection = model.metadata.get("selection")
    chosen = (
        {"chosen by": f"--method auto: {selection['chosen']} ({selection['reason']}; table in metadata.json)"}
        if isinstance(selection, dict) and "chosen" in selection
        else {}
    )
    return {
        "model": str(model.run_dir.resolve()),
        "model id": model.model_id,
        "method": model.detector.name,
        **chosen,
        "runtime": model.runtime,
        "trained": str(model.metadata.get("created", "unknown")),
        "calibrated": f"{cal.created or 'unknown'} ({cal.mode}, {cal.n_good} good images)",
        "image threshold": f"{cal.image_threshold:.5g} (defect if score >= threshold; score = raw anomaly score)",
        "pixel threshold": f"{cal.pixel_threshold:.5g} (the outlined regions of a defect)",
        "source folder": str(images_dir.resolve()),
        "written": utc_now(),
    }


def _link(target: Path, base: Path) -> str:
    """A link from a page in ``base`` to ``target``: relative (the two folders may move together), else a file URI."""
    try:
        return Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return target.resolve().as_uri()


def _gallery_entry(result: ImageResult, stem: str, out_dir: Path) -> dict[str, Any]:
    """The index.html card of one scored image (the same numbers as its record)."""
    record = result.record
    return {
        "image": f"{stem}.png",
        "source": record.path,
        "original": _link(result.item.path, out_dir),
        "score": record.score,
        "threshold": record.threshold,
        "verdict": record.verdict,
        "n_regions": record.n_regions or 0,
        "warnings": list(record.warnings),
        "width": record.width,
        "height": record.height,
    }


def heatmap_folder(
    model: LoadedModel,
    images_dir: Path,
    out_dir: Path,
    *,
    save_maps: bool = False,
    on_result: Callable[[ImageResult], None] | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    reporter: Reporter | None = None,
    force: bool = False,
    opacity: float | None = None,
    shard: Shard | None = None,
) -> tuple[ScoreSummary, Path]:
    """Write an overlay PNG per image (and optionally the raw map as .npy) plus ``index.html``.

    ``out_dir`` follows the output rules (:mod:`surfaceinspect.outputs`): never the input folder,
    a dedicated subfolder of it at most. ``index.html`` lists unreadable files too, shows the
    model, thresholds and source folder (and the shard, with ``shard``), and is written even
    when the run is interrupted. ``out_dir`` is locked while it is written (:func:`lock_output`).
    """
    from surfaceinspect.atomic import atomic_open
    from surfaceinspect.rendering import DEFAULT_OPACITY, render_overlay, save_png, write_index_html

    reporter = reporter or Reporter(quiet=True)
    if prepare_output_dir(out_dir, [images_dir], force=force, refuse_links=True).reused:
        reporter.info(f"{out_dir} is not empty: earlier overlays with the same names are replaced")
    entries: list[dict[str, Any]] = []
    used: set[str] = set()
    calibration = model.calibration

    def render(result: ImageResult) -> None:
        record = result.record
        if on_result is not None:
            on_result(result)
        if record.verdict == "error" or result.anomaly_map is None or result.item.original is None:
            entries.append(
                {
                    "source": record.path,
                    "original": _link(result.item.path, out_dir),
                    "verdict": "error",
                    "error": record.error or "unreadable",
                }
            )
            return
        stem = _output_stem(record.path, used)
        # Outlined: exactly the regions the record counts (those of a defect, at the pixel threshold).
        regions = result.anomaly_map >= calibration.pixel_threshold
        overlay = render_overlay(
            result.item.original,
            calibration.normalize_map(result.anomaly_map),
            label=f"score {format_score(record.score)}  threshold {format_score(record.threshold)}",
            verdict=record.verdict,
            alpha=DEFAULT_OPACITY if opacity is None else opacity,
            outline=regions if record.verdict == "defect" else np.zeros_like(regions),
        )
        save_png(out_dir / f"{stem}.png", overlay, below=out_dir)  # never through a link below out_dir
        if save_maps:
            with atomic_open(out_dir / f"{stem}.npy", "wb", below=out_dir) as handle:
                np.save(handle, result.anomaly_map.astype(np.float32, copy=False))
        entries.append(_gallery_entry(result, stem, out_dir))

    context = _gallery_context(model, images_dir)
    if shard is not None:
        context["shard"] = f"{shard.index} of {shard.count} (numbered 0..{shard.count - 1}): only this shard's images"
    lock = lock_output(out_dir, "--out", "folder")
    try:
        summary = score_folder(
            model,
            images_dir,
            on_result=render,
            batch_size=batch_size,
            workers=workers,
            keep_original=True,
            reporter=reporter,
            label="heatmap",
            shard=shard,
        )
    except KeyboardInterrupt:
        # Leave a valid gallery of what was done before the interruption.
        note = f"Interrupted: only the first {len(entries)} images were processed."
        write_index_html(out_dir, entries, context=context, note=note)
        reporter.warn(f"interrupted; {out_dir / 'index.html'} shows the {len(entries)} images done")
        raise
    else:
        index = write_index_html(out_dir, entries, context=context)
    finally:
        lock.release()
    return summary, index
