"""Loading a trained model (a run directory or an exported one) for scoring."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surfaceinspect.analysis.calibration import Calibration
from surfaceinspect.deploy import runtimes
from surfaceinspect.detectors import Scorer
from surfaceinspect.device import configure_threads, resolve_device, scores_on_cpu
from surfaceinspect.errors import ModelDirError
from surfaceinspect.storage import modeldir


@dataclass
class LoadedModel:
    run_dir: Path
    detector: Scorer
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
    instead of torch (see :mod:`surfaceinspect.deploy.runtimes`); every later step is the same. ``None``
    or ``auto``: see :func:`surfaceinspect.deploy.runtimes.auto_runtime`.

    The calibration must be the model's own (:meth:`Calibration.check_model`), and every file that
    affects a verdict must match the folder's manifest (:func:`modeldir.verify_sums`); both are read
    once here, never per image. ``need_calibration=False`` (recalibrate, which replaces it) loads
    a model whose calibration is missing, damaged or another model's, with ``calibration`` None.
    """
    run_dir = modeldir.resolve_model_dir(model_dir)
    if runtime in (None, "auto"):
        runtime = runtimes.auto_runtime(run_dir, scores_on_cpu(device), inference_sets)
    if runtime != "torch" or runtimes.is_export_dir(run_dir):
        # torch stays unimported here: --runtime onnx ignores --device, and --threads goes to onnxruntime
        detector, metadata = runtimes.load_exported(run_dir, runtime, threads, inference_sets)
        runtime = detector.runtime
    else:
        configure_threads(threads)
        detector, metadata = modeldir.load_model(run_dir, resolve_device(device), inference_sets)
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
