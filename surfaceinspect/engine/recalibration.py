"""recalibrate and recalibrate --undo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surfaceinspect.analysis.calibration import Calibration
from surfaceinspect.deploy import runtimes
from surfaceinspect.engine.calibration import calibrate_detector, labelled_split
from surfaceinspect.engine.inputs import find_images, refuse_labelled_folder
from surfaceinspect.engine.loading import LoadedModel
from surfaceinspect.errors import ConfigError, DatasetError, ModelDirError
from surfaceinspect.storage import modeldir
from surfaceinspect.ui import Reporter


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
