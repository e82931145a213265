"""Calibration of a trained detector on held-out good (or labelled) images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from surfaceinspect.analysis.calibration import Calibration, calibrate
from surfaceinspect.config import RunConfig
from surfaceinspect.data.datasets import labelled_folder
from surfaceinspect.detectors import Scorer
from surfaceinspect.engine.checks import ColourCheck
from surfaceinspect.engine.inference import run_inference
from surfaceinspect.engine.inputs import report_failures
from surfaceinspect.errors import DatasetError
from surfaceinspect.ui import Reporter


def calibrate_detector(
    detector: Scorer,
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
    report_failures(reporter, failures, "calibration image")
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
