"""The workflows behind the CLI: train (with calibration and resume), score, heatmap, recalibrate.

Method-independent: detectors are reached only through the Detector interface and the registry.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from surfaceinspect import modeldir
from surfaceinspect.calibration import Calibration, calibrate
from surfaceinspect.config import RunConfig, run_config_from_dict
from surfaceinspect.data import LoadedImage, iterate_images, load_training_images, stack_images
from surfaceinspect.datasets import labelled_folder
from surfaceinspect.detectors import Detector, TrainContext, get_detector_class
from surfaceinspect.device import configure_threads, resolve_device
from surfaceinspect.errors import (
    EXIT_DEFECT,
    EXIT_OK,
    EXIT_UNREADABLE,
    ConfigError,
    DatasetError,
)
from surfaceinspect.imageio import discover_images
from surfaceinspect.records import ScoreRecord
from surfaceinspect.regions import find_regions
from surfaceinspect.ui import Reporter, TrainProgressView

MAX_LISTED_FAILURES = 10


# ---------------------------------------------------------------------------------------------
# Helpers


def require_input(path: Path) -> Path:
    """Fail early (before loading a model) when the image file or folder does not exist."""
    if not path.exists():
        raise DatasetError(f"{path} does not exist; give an image file or a folder of images")
    return path


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or its name when ``root`` is the file itself."""
    try:
        rel = path.relative_to(root)
        return rel.as_posix() if str(rel) != "." else path.name
    except ValueError:
        return path.name


def split_calibration(files: Sequence[Path], run_config: RunConfig) -> tuple[list[Path], list[Path]]:
    """Deterministically hold out ``max(min_images, fraction * N)`` files for calibration."""
    cal = run_config.common.calibration
    n = len(files)
    n_cal = max(cal.min_images, round(cal.fraction * n))
    if n - n_cal < 2:
        raise DatasetError(
            f"{n} good images found, but calibration holds out {n_cal} and training needs at least 2 more; "
            f"add images or lower common.calibration.min_images / fraction (--set common.calibration.min_images=N)"
        )
    order = np.random.default_rng(run_config.common.seed).permutation(n)
    cal_idx = set(order[:n_cal].tolist())
    train = [f for i, f in enumerate(files) if i not in cal_idx]
    calib = [f for i, f in enumerate(files) if i in cal_idx]
    return train, calib


def _report_failures(reporter: Reporter, failures: list[tuple[Path, str]], what: str) -> None:
    for path, reason in failures[:MAX_LISTED_FAILURES]:
        reporter.warn(f"skipped unreadable {what} {path}: {reason}")
    if len(failures) > MAX_LISTED_FAILURES:
        reporter.warn(f"... and {len(failures) - MAX_LISTED_FAILURES} more unreadable {what}s")


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
) -> Iterator[ImageResult]:
    """Score ``paths`` in batches; yield one ImageResult per file, in order, errors included.

    With a calibration, records carry the verdict, normalised score and defect regions (at the
    pixel threshold, on the map resized to the file's own resolution).
    """
    for batch in iterate_images(paths, detector.input_size, batch_size, workers, keep_original):
        readable = [item for item in batch if item.image is not None]
        prediction = detector.predict(stack_images(readable)) if readable else None
        position = 0
        for item in batch:
            name = relative_name(item.path, root)
            if item.image is None:
                yield ImageResult(item, ScoreRecord(path=name, verdict="error", error=item.error), None)
                continue
            assert prediction is not None
            score = float(prediction.scores[position])
            small_map = prediction.maps[position].numpy().astype(np.float32, copy=False)
            position += 1
            height, width = item.original_size
            full_map = (
                cv2.resize(small_map, (width, height), interpolation=cv2.INTER_LINEAR)
                if full_resolution_maps and (height, width) != small_map.shape
                else small_map
            )
            record = ScoreRecord(path=name, verdict="good", score=score, width=width, height=height)
            if not math.isfinite(score):
                record.verdict = "error"
                record.error = "the model produced a non-finite score for this image"
            elif calibration is not None:
                record.score_normalized = float(calibration.normalize(score))
                defect = calibration.is_defect(score)
                record.verdict = "defect" if defect else "good"
                regions = find_regions(full_map, calibration.pixel_threshold) if defect else []
                record.n_regions = len(regions)
                if regions:
                    largest = regions[0]
                    record.largest_region_area = int(largest.area)
                    record.bbox_x, record.bbox_y, record.bbox_width, record.bbox_height = (int(v) for v in largest.bbox)
            yield ImageResult(item, record, full_map)


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
) -> Calibration:
    """Score calibration images and build the Calibration (mode and targets from the config)."""
    common = run_config.common
    settings = common.calibration
    good_scores: list[float] = []
    maxima: list[float] = []
    medians: list[float] = []
    defect_scores: list[float] = []
    failures: list[tuple[Path, str]] = []
    all_paths = list(good_paths) + list(defect_paths)
    n_good = len(good_paths)
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
                good_scores.append(float(result.record.score))
                maxima.append(float(result.anomaly_map.max()))
                medians.append(float(np.median(result.anomaly_map)))
            else:
                defect_scores.append(float(result.record.score))
    _report_failures(reporter, failures, "calibration image")
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
    )
    for note in calibration.notes:
        reporter.warn(note)
    return calibration


def _labelled_split(calibration_dir: Path) -> tuple[list[Path], list[Path]]:
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


def train(
    data_dir: Path | None,
    run_config: RunConfig | None,
    *,
    reporter: Reporter | None = None,
    run_dir: Path | None = None,
    resume_dir: Path | None = None,
    calibration_dir: Path | None = None,
    files: Sequence[Path] | None = None,
) -> TrainResult:
    """Train a detector on good images, calibrate it, and write a finished model directory.

    ``resume_dir`` continues an interrupted run from its last checkpoint (config and data taken
    from the checkpoint). ``calibration_dir`` (good/ + defect subfolders) replaces the held-out
    split as the calibration set; it is required for calibration modes f1 and recall. ``files``
    restricts training to these images of ``data_dir`` (default: every image found in it).
    """
    reporter = reporter or Reporter(quiet=True)
    started = time.monotonic()
    resume_state, seconds_before = None, 0.0
    if resume_dir is not None:
        checkpoint = modeldir.load_checkpoint(resume_dir)
        method = str(checkpoint.run_config["method"])
        run_config = run_config_from_dict(get_detector_class(method).config_cls, checkpoint.run_config)
        data_dir = Path(checkpoint.data_dir)
        train_files = [data_dir / f for f in checkpoint.train_files]
        calib_files = [data_dir / f for f in checkpoint.calibration_files]
        resume_state = checkpoint.detector_state
        seconds_before = checkpoint.train_seconds
        run_config.method_config.check_resources()
        run_dir = resume_dir
        reporter.info(f"resuming {run_dir} ({method}, data {data_dir})")
    else:
        if data_dir is None or run_config is None:
            raise ConfigError("train needs a folder of good images (or --resume RUN_DIR)")
        run_config.method_config.check_resources()  # e.g. pretrained weights: fail before reading data
        files = list(files) if files is not None else discover_images(data_dir)
        if not files:
            raise DatasetError(f"no images found in {data_dir}; point train at a folder of .png/.jpg/.bmp/.tif files")
        if calibration_dir is not None:
            train_files, calib_files = files, []
        else:
            train_files, calib_files = split_calibration(files, run_config)
        run_dir = run_dir or modeldir.new_run_dir(run_config.method)
        run_dir.mkdir(parents=True, exist_ok=True)
    assert run_config is not None and data_dir is not None
    if run_config.common.calibration.mode != "quantile" and calibration_dir is None:
        raise ConfigError(
            f"calibration mode {run_config.common.calibration.mode} needs defective examples: pass "
            "--calibration-dir DIR with good/ and defect subfolders, or use mode quantile"
        )
    device = _prepare(run_config)
    common = run_config.common
    reporter.info(
        f"training [bold]{run_config.method}[/bold] (profile {run_config.profile}) on {device}: "
        f"{len(train_files)} training images, {len(calib_files) or 'labelled folder for'} calibration; "
        f"run directory {run_dir}"
    )

    images, ok_paths, failures = load_training_images(train_files, common.input_hw(), common.workers, common.batch_size)
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
    rel_train = [relative_name(p, data_dir) for p in train_files]
    rel_calib = [relative_name(p, data_dir) for p in calib_files]

    def write_checkpoint(state: dict[str, Any]) -> None:
        modeldir.save_checkpoint(
            run_dir,
            modeldir.TrainCheckpoint(
                run_config.to_dict(), str(data_dir), rel_train, rel_calib, state, context.elapsed_s()
            ),
        )

    view = TrainProgressView(reporter)
    context = TrainContext(
        on_progress=view,
        on_checkpoint=write_checkpoint,
        checkpoint_every_s=common.checkpoint_every_s,
        resume_state=resume_state,
        time_budget_s=common.time_budget_min * 60.0,
        elapsed_before_s=seconds_before,
    )
    try:
        summary = detector.fit(images, context).to_dict()
    finally:
        view.close()
    del images
    summary = {
        **summary,
        "n_train_images": len(ok_paths),
        "n_unreadable_train_images": len(failures),
        "unreadable_train_images": [relative_name(p, data_dir) for p, _ in failures],
        "resumed": resume_dir is not None,
    }
    fingerprint = modeldir.dataset_fingerprint(data_dir, list(train_files) + list(calib_files))
    modeldir.save_model(run_dir, detector, summary, fingerprint, extra={"calibration_files": rel_calib})

    if calibration_dir is not None:
        good, defect = _labelled_split(calibration_dir)
        calibration = calibrate_detector(
            detector, good, calibration_dir, run_config, reporter, defect, str(calibration_dir)
        )
    else:
        calibration = calibrate_detector(
            detector,
            calib_files,
            data_dir,
            run_config,
            reporter,
            source=f"{len(calib_files)} held-out images of {data_dir}",
        )
    calibration.save(run_dir / modeldir.CALIBRATION_FILE)
    modeldir.mark_latest(run_dir)
    (run_dir / modeldir.CHECKPOINT_FILE).unlink(missing_ok=True)
    summary["total_seconds"] = round(time.monotonic() - started, 2)
    return TrainResult(run_dir, summary, calibration)


# ---------------------------------------------------------------------------------------------
# Load, recalibrate


@dataclass
class LoadedModel:
    run_dir: Path
    detector: Detector
    calibration: Calibration
    metadata: dict[str, Any]


def load(
    model_dir: str | Path | None, device: str = "auto", threads: int = 0, inference_sets: Sequence[str] = ()
) -> LoadedModel:
    """Load a finished run (``None`` = the latest) with its calibration.

    ``inference_sets`` override inference settings (see ``config.with_inference_overrides``); the
    stored calibration then no longer matches the scores, so callers recalibrate.
    """
    run_dir = modeldir.resolve_model_dir(model_dir)
    configure_threads(threads)
    detector, metadata = modeldir.load_model(run_dir, resolve_device(device), inference_sets)
    calibration = Calibration.load(run_dir / modeldir.CALIBRATION_FILE)
    return LoadedModel(run_dir, detector, calibration, metadata)


def recalibrate(
    model: LoadedModel,
    folder: Path,
    *,
    labelled: bool,
    mode: str | None = None,
    false_reject_rate: float | None = None,
    target_recall: float | None = None,
    reporter: Reporter | None = None,
) -> Calibration:
    """Recompute the calibration of a trained model from a new folder, without retraining."""
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
    if labelled:
        good, defect = _labelled_split(folder)
    else:
        if settings.mode != "quantile":
            raise ConfigError(f"mode {settings.mode} needs --labelled and a folder with good/ and defect subfolders")
        good, defect = discover_images(folder), []
        if not good:
            raise DatasetError(f"no images found in {folder}")
    calibration = calibrate_detector(model.detector, good, folder, run_config, reporter, defect, str(folder))
    calibration.save(model.run_dir / modeldir.CALIBRATION_FILE)
    model.calibration = calibration
    return calibration


# ---------------------------------------------------------------------------------------------
# Score


@dataclass
class ScoreSummary:
    n_good: int = 0
    n_defect: int = 0
    n_error: int = 0
    seconds: float = 0.0
    worst: list[tuple[float, str, str]] = field(default_factory=list)  # (score, path, verdict)

    @property
    def total(self) -> int:
        return self.n_good + self.n_defect + self.n_error

    def exit_code(self) -> int:
        """1 if any defect, else 3 if any unreadable, else 0."""
        if self.n_defect:
            return EXIT_DEFECT
        if self.n_error:
            return EXIT_UNREADABLE
        return EXIT_OK


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
) -> ScoreSummary:
    """Score every image under ``images_dir`` (recursive), calling ``on_result`` as each is done.

    Memory stays flat: nothing per image is kept beyond the ``n_worst`` highest scores.
    """
    reporter = reporter or Reporter(quiet=True)
    paths = discover_images(images_dir)
    if not paths:
        raise DatasetError(f"no images found in {images_dir}; expected .png/.jpg/.jpeg/.bmp/.tif files")
    common = model.detector.run_config.common
    summary = ScoreSummary()
    worst: list[tuple[float, str, str]] = []
    started = time.monotonic()
    root = images_dir if images_dir.is_dir() else images_dir.parent
    with reporter.progress(label, len(paths)) as bar:
        for result in run_inference(
            paths,
            root,
            model.detector,
            model.calibration,
            batch_size=batch_size or common.batch_size,
            workers=common.workers if workers is None else workers,
            keep_original=keep_original,
        ):
            record = result.record
            if record.verdict == "error":
                summary.n_error += 1
            elif record.verdict == "defect":
                summary.n_defect += 1
            else:
                summary.n_good += 1
            if record.score is not None and math.isfinite(record.score):
                entry = (record.score, record.path, record.verdict)
                if len(worst) < n_worst:
                    heapq.heappush(worst, entry)
                else:
                    heapq.heappushpop(worst, entry)
            on_result(result)
            bar.update(advance=1, extra=f"{summary.n_defect} defect, {summary.n_error} unreadable")
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
) -> tuple[ScoreSummary, Path]:
    """Write an overlay PNG per image (and optionally the raw map as .npy) plus ``index.html``."""
    from surfaceinspect.atomic import atomic_open
    from surfaceinspect.rendering import render_overlay, save_png, write_index_html

    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    used: set[str] = set()
    calibration = model.calibration

    def render(result: ImageResult) -> None:
        record = result.record
        if on_result is not None:
            on_result(result)
        if record.verdict == "error" or result.anomaly_map is None or result.item.original is None:
            return
        stem = _output_stem(record.path, used)
        overlay = render_overlay(
            result.item.original,
            calibration.normalize_map(result.anomaly_map),
            label=f"score {record.score_normalized:.2f}  (raw {record.score:.4g})",
            verdict=record.verdict,
        )
        save_png(out_dir / f"{stem}.png", overlay)
        if save_maps:
            with atomic_open(out_dir / f"{stem}.npy", "wb") as handle:
                np.save(handle, result.anomaly_map.astype(np.float32, copy=False))
        entries.append(
            {
                "image": f"{stem}.png",
                "source": record.path,
                "score": record.score,
                "score_normalized": record.score_normalized,
                "verdict": record.verdict,
                "n_regions": record.n_regions or 0,
            }
        )

    summary = score_folder(
        model,
        images_dir,
        on_result=render,
        batch_size=batch_size,
        workers=workers,
        keep_original=True,
        reporter=reporter,
        label="heatmap",
    )
    index = write_index_html(out_dir, entries)
    return summary, index


# ---------------------------------------------------------------------------------------------
# Configuration from command-line layers


def resolve_run_config(
    method: str | None,
    profile: str | None,
    config_file: Path | None,
    common_flags: dict[str, Any],
    method_flags: dict[str, Any],
    sets: Sequence[str] = (),
) -> RunConfig:
    """Build the effective config: profile < ``--config`` file < named flags < ``--set`` items.

    ``method_flags`` name fields of the method's config (e.g. ``epochs``, ``backbone_weights``);
    a flag that the chosen method does not have is an error, not silently ignored.
    """
    import dataclasses

    from surfaceinspect.config import build_run_config, deep_merge, load_yaml_file, parse_set_option

    file_layer = load_yaml_file(config_file) if config_file else {}
    method = method or file_layer.get("method") or "draem"
    cls = get_detector_class(str(method)).config_cls
    known = {f.name for f in dataclasses.fields(cls)}
    flag_layer: dict[str, Any] = {"common": {}, method: {}}
    for key, value in common_flags.items():
        if value is None:
            continue
        if "." in key:  # nested, e.g. calibration.fraction
            section, sub = key.split(".", 1)
            flag_layer["common"].setdefault(section, {})[sub] = value
        else:
            flag_layer["common"][key] = value
    for key, value in method_flags.items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to method {method}")
        flag_layer[method][key] = value
    for item in sets:
        flag_layer = deep_merge(flag_layer, parse_set_option(item))
    return build_run_config(cls, profile, [file_layer, flag_layer])
