"""``surfaceinspect export``: one self-contained ONNX artefact per trained run, proven to score like it.

The graph is the detector's :meth:`~surfaceinspect.detectors.base.Detector.inference_module`
(everything ``predict`` does: DRAEM's networks, softmax and smoothing; CS-Flow's backbone,
normalisation, flow and map post-processing), exported with torch's dynamo ONNX exporter with
a dynamic batch axis. Before anything is written, the exported graph runs in onnxruntime next to
the torch detector on the run's held-out calibration images (or ``--images``); the export is
refused unless every score and map value agrees within :data:`RTOL` of the larger of the value
and the calibrated threshold, and every verdict is identical. The files are written atomically,
``export.json`` after the graph (its checksum of ``model.onnx`` makes a half-replaced folder fail to
load), then the folder's ``SHA256SUMS`` (and, for the run's own ``export-onnx/``, the run's).

Tiled runs: the graph is the per-tile model (input = the tile size); cutting the image into
tiles and blending the tile maps happen outside the graph (``export.json`` says how), and
``score --runtime onnx`` does both exactly as the torch runtime does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import surfaceinspect
from surfaceinspect.analysis.calibration import Calibration
from surfaceinspect.data.imageio import discover_images
from surfaceinspect.deploy import runtimes
from surfaceinspect.detectors.base import Detector, Prediction
from surfaceinspect.errors import SurfaceInspectError
from surfaceinspect.storage import modeldir
from surfaceinspect.storage.atomic import write_bytes_atomic, write_json_atomic
from surfaceinspect.storage.outputs import prepare_output_dir
from surfaceinspect.ui import Reporter

FORMATS = ("onnx",)
OPSET = 18
# Parity: |exported - torch| <= RTOL * max(|torch value|, |threshold|) for every score and map
# value. Measured differences are ~1e-7 relative (float32 reassociation); 1e-3 leaves room for
# other CPUs' kernels while catching a wrong graph (a wrong resize or smoothing is > 1e-2).
RTOL = 1e-3
PARITY_IMAGES = 8


class ExportError(SurfaceInspectError):
    """The model cannot be exported, or the export does not score like the model (nothing written)."""


@dataclass
class ParityReport:
    """How the exported graph compared with the torch detector."""

    n_images: int
    max_score_diff: float
    max_map_diff: float
    score_tolerance: float
    map_tolerance: float
    verdicts_differ: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            not self.verdicts_differ
            and self.max_score_diff <= self.score_tolerance
            and self.max_map_diff <= self.map_tolerance
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.n_images,
            "max_abs_score_diff": self.max_score_diff,
            "max_abs_map_diff": self.max_map_diff,
            "score_tolerance": self.score_tolerance,
            "map_tolerance": self.map_tolerance,
            "rule": f"|onnx - torch| <= {RTOL:g} * max(|torch value|, threshold); verdicts identical "
            "(except for scores within that tolerance of the threshold)",
            "verdicts_identical": not self.verdicts_differ,
        }

    def describe(self) -> str:
        return (
            f"{self.n_images} images: max |score diff| {self.max_score_diff:.3g} "
            f"(tolerance {self.score_tolerance:.3g}), "
            f"max |map diff| {self.max_map_diff:.3g} (tolerance {self.map_tolerance:.3g}), "
            f"{len(self.verdicts_differ)} verdicts differ"
        )


def onnx_bytes(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    """Export ``module`` (images -> (scores, maps)) to a serialised ONNX model with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter logs every stage and warns about its own internals: noise on an operator's terminal.
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [log.level for log in quiet]  # restored afterwards: the caller's logging is not ours to change
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        # redirect_stdout: the exporter prints its progress ("[torch.onnx] ... ✅") to stdout.
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[runtimes.INPUT_NAME],
                output_names=list(runtimes.OUTPUT_NAMES),
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                verbose=False,
            )
    except ImportError as exc:
        raise ExportError(
            f"exporting needs the {exc.name or 'onnx/onnxscript'} package, which is not installed; install it with "
            f"{runtimes.pip_install('onnx onnxscript onnxruntime')} (or `make install`)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user needs one line
        raise ExportError(f"torch.onnx could not export this model: {first_line(exc)}") from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    if program is None:
        raise ExportError("torch.onnx returned no program")
    return program.model_proto.SerializeToString()


def compare(
    reference: Prediction, exported: Prediction, calibration: Calibration, names: Sequence[str]
) -> ParityReport:
    """Compare two predictions of the same images against the parity rule (see :data:`RTOL`)."""
    ref_s, exp_s = reference.scores.double().numpy(), exported.scores.double().numpy()
    ref_m, exp_m = reference.maps.double().numpy(), exported.maps.double().numpy()
    if ref_m.shape != exp_m.shape or ref_s.shape != exp_s.shape:
        raise ExportError(
            f"the exported model returns maps {exp_m.shape} / scores {exp_s.shape}, the torch model "
            f"{ref_m.shape} / {ref_s.shape}; nothing written"
        )
    score_scale = max(float(np.abs(ref_s).max(initial=0.0)), abs(calibration.image_threshold))
    map_scale = max(float(np.abs(ref_m).max(initial=0.0)), abs(calibration.pixel_threshold))
    # The quantile threshold is the score of one calibration image, and those are the default parity
    # images: that image sits exactly on the threshold, and float rounding (1e-7) decides its verdict
    # in any runtime. A flip counts only where the torch score is clear of the threshold.
    tie = RTOL * score_scale
    differ = [
        name
        for name, a, b in zip(names, ref_s.tolist(), exp_s.tolist(), strict=True)
        if not np.isfinite(b)
        or (calibration.is_defect(a) != calibration.is_defect(b) and abs(a - calibration.image_threshold) > tie)
    ]
    return ParityReport(
        n_images=len(names),
        max_score_diff=float(np.abs(ref_s - exp_s).max(initial=0.0)) if np.isfinite(exp_s).all() else float("inf"),
        max_map_diff=float(np.abs(ref_m - exp_m).max(initial=0.0)) if np.isfinite(exp_m).all() else float("inf"),
        score_tolerance=RTOL * score_scale,
        map_tolerance=RTOL * map_scale,
        verdicts_differ=differ,
    )


def parity_paths(run_dir: Path, metadata: dict[str, Any], images: Path | None, limit: int) -> list[Path]:
    """The images parity is checked on: ``images`` if given, else the run's held-out calibration images."""
    if images is not None:
        if not images.exists():
            raise ExportError(f"--images {images} does not exist; pass a folder of images like the ones you score")
        found = discover_images(images) if images.is_dir() else [images]
        hint = f"--images {images} holds no images"
    else:
        root = Path(str(metadata.get("dataset", {}).get("root", "")))
        found = [root / name for name in metadata.get("calibration_files", [])]
        found = [p for p in found if p.is_file()]
        hint = f"the calibration images of {run_dir} (under {root}) are not readable here"
    if not found:
        raise ExportError(f"{hint}; parity needs real images: pass --images DIR (a few good images suffice)")
    return sorted(found)[:limit]


def read_parity_batch(paths: Sequence[Path], size: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    """The images as the engine feeds them to ``predict``: RGB in [0, 1], resized to ``size``."""
    from surfaceinspect.data.streaming import iterate_images, stack_images

    items = [item for batch in iterate_images(paths, size, len(paths), 0) for item in batch if item.image is not None]
    if not items:
        raise ExportError(f"none of the {len(paths)} parity images could be read; pass --images DIR")
    return torch.from_numpy(stack_images(items)), [item.path.name for item in items]


def manifest(
    detector: Detector,
    calibration: Calibration,
    metadata: dict[str, Any],
    run_dir: Path,
    model: bytes,
    parity: ParityReport,
) -> dict[str, Any]:
    """The input contract and everything a user of another language needs to reproduce a verdict."""
    h, w = detector.input_size
    common = detector.run_config.common
    tiling = common.tiling
    return {
        "format": runtimes.EXPORT_FORMAT,
        "format_version": runtimes.EXPORT_FORMAT_VERSION,
        "runtime_format": "onnx",
        "opset": OPSET,
        "model_file": runtimes.ONNX_FILE,
        "model_sha256": runtimes.sha256_bytes(model),
        "method": detector.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "surfaceinspect_version": surfaceinspect.__version__,
        "source_run": str(run_dir.resolve()),
        "source_weights_sha256": metadata.get("weights_sha256"),
        "manifest": modeldir.SUMS_FILE,  # SHA256SUMS covers model.onnx, export.json and calibration.json
        "input": {
            "name": runtimes.INPUT_NAME,
            "shape": ["batch", 3, h, w],
            "height": h,
            "width": w,
            "dtype": "float32",
            "layout": "NCHW",
            "channel_order": "RGB (grey images repeated to 3 channels)",
            "value_range": [0.0, 1.0],
            "normalisation": "8-bit pixel / 255 (16-bit / 65535); no mean/std: the graph applies what the method needs",
            "resize": (
                "none: the graph takes tiles of the image at its own resolution (see tiling)"
                if tiling.enabled
                else f"whole image to {h}x{w} (HxW); per axis: area averaging where it shrinks, bilinear "
                "(align_corners=False) where it grows; the aspect ratio is not kept"
            ),
        },
        "outputs": {
            "score": {"shape": ["batch"], "units": "raw anomaly score; higher = more anomalous"},
            "map": {
                "shape": ["batch", h, w],
                "units": "raw, the same units as score; resize bilinearly to the image's size for regions",
            },
        },
        "verdict": "defect if score >= image_threshold; regions: map pixels >= pixel_threshold",
        "thresholds": {
            "image_threshold": calibration.image_threshold,
            "pixel_threshold": calibration.pixel_threshold,
            "image_scale": calibration.image_scale,
            "pixel_scale": calibration.pixel_scale,
            "score_normalized": "1 / (1 + exp(-(score - image_threshold) / image_scale))",
        },
        "tiling": (
            {
                **dataclasses.asdict(tiling),
                "tile": [h, w],
                "note": "the graph scores one tile; cut the image (resized by scale) into overlapping tiles, blend "
                "the tile maps with surfaceinspect.data.tiling's window; the image score is the highest tile score",
            }
            if tiling.enabled
            else None
        ),
        "parity": parity.to_dict(),
        "config": detector.run_config.to_dict(),
        "training": {
            k: metadata.get("training", {}).get(k) for k in ("image_colour", "image_aspect", "image_aspect_range")
        },
    }


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_graph(model: bytes, runtime: str, batch: torch.Tensor) -> Prediction:
    """Run the serialised graph once in ``runtime`` on ``batch``."""
    scores, maps = runtimes.graph_runner(model, runtime)(batch.numpy())
    return Prediction(torch.from_numpy(np.asarray(scores)), torch.from_numpy(np.asarray(maps)))


def other_runtime_parity(
    model: bytes,
    runtime: str,
    batch: torch.Tensor,
    reference: Prediction,
    calibration: Calibration,
    names: Sequence[str],
) -> dict[str, Any]:
    """The parity of an optional runtime (recorded; ``--runtime X`` refuses an export without a pass)."""
    try:
        report = compare(reference, run_graph(model, runtime, batch), calibration, names)
    except SurfaceInspectError as exc:  # not installed: the one-line install hint
        return {"passed": False, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the optional runtime failed; the ONNX artefact is still good
        return {"passed": False, "reason": f"{runtime} failed: {first_line(exc)}"}
    return {"passed": report.passed, **report.to_dict()}


@dataclass
class ExportResult:
    out_dir: Path
    parity: ParityReport
    files: list[Path]
    parity_other: dict[str, dict[str, Any]] = field(default_factory=dict)  # optional runtimes (openvino)


def export_run(
    run_dir: Path,
    detector: Detector,
    calibration: Calibration,
    metadata: dict[str, Any],
    out_dir: Path | None = None,
    *,
    fmt: str = "onnx",
    images: Path | None = None,
    n_images: int = PARITY_IMAGES,
    force: bool = False,
    tamper: Callable[[bytes], bytes] | None = None,
) -> ExportResult:
    """Export a loaded run; check parity on real images; write the folder only if it passes.

    ``tamper`` (tests only) changes the serialised graph before the parity check.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt} is not supported; choose one of: {', '.join(FORMATS)}")
    out_dir = out_dir if out_dir is not None else run_dir / runtimes.DEFAULT_EXPORT_SUBDIR
    if out_dir.resolve() == run_dir.resolve():
        raise ExportError(
            f"--out {out_dir} is the run folder; choose a new folder "
            f"(default: {run_dir / runtimes.DEFAULT_EXPORT_SUBDIR})"
        )
    inputs = [images] if images is not None else []
    prepare_output_dir(out_dir, inputs, force=force)  # refused paths fail before the slow export
    runtimes.import_onnxruntime()
    paths = parity_paths(run_dir, metadata, images, n_images)
    batch, names = read_parity_batch(paths, detector.input_size)
    try:
        module = detector.inference_module()
    except NotImplementedError as exc:
        raise ExportError(str(exc)) from None
    # Two example images: with one, torch.export would fix the batch axis at 1.
    model = onnx_bytes(module, batch[:2] if len(batch) >= 2 else batch.repeat(2, 1, 1, 1))
    if tamper is not None:
        model = tamper(model)
    reference = detector.predict(batch)
    try:
        exported = run_graph(model, "onnx", batch)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot run the exported model ({first_line(exc)}); nothing written") from None
    report = compare(reference, exported, calibration, names)
    if not report.passed:
        raise ExportError(
            f"the exported model does not score like the torch model ({report.describe()}); nothing written"
        )
    other = {
        runtime: other_runtime_parity(model, runtime, batch, reference, calibration, names) for runtime in ("openvino",)
    }
    files = [out_dir / runtimes.ONNX_FILE, out_dir / modeldir.CALIBRATION_FILE, out_dir / runtimes.MANIFEST_FILE]
    write_bytes_atomic(files[0], model)
    calibration.save(files[1])
    write_json_atomic(
        files[2], {**manifest(detector, calibration, metadata, run_dir, model, report), "parity_other": other}
    )
    files.append(out_dir / modeldir.SUMS_FILE)
    modeldir.write_sums(out_dir, changed=modeldir.EXPORT_FILES)
    if out_dir.resolve() == (run_dir / modeldir.EXPORT_SUBDIR).resolve():  # the run's own export: part of the run
        modeldir.write_sums(run_dir, changed=[f"{modeldir.EXPORT_SUBDIR}/{name}" for name in modeldir.EXPORT_FILES])
    return ExportResult(out_dir, report, files, other)


def export_after_training(run_dir: Path, reporter: Reporter, threads: int = 0) -> str | None:
    """Export a just-trained run to RUN/export-onnx as ``surfaceinspect export`` does (``train``, ``demo``).

    Returns the run's model id after the export (the export adds its files to the run's SHA256SUMS,
    which changes the id records carry), or None when the export was refused. The model is complete
    before the export starts, so a refusal (parity, an operator the exporter lacks, a missing
    package) is a warning: the run scores with torch.
    """
    from surfaceinspect import engine

    reporter.info("exporting to ONNX and checking parity (skip with --no-export)...")
    started = time.monotonic()
    try:
        # a fresh load, as `export` does: under torchrun, rank 0's detector is the data-parallel one
        loaded = engine.load(run_dir, device="cpu", threads=threads, runtime="torch")
        exported = export_run(loaded.run_dir, loaded.detector, loaded.calibration, loaded.metadata)
    except Exception as exc:  # noqa: BLE001 - the model is saved: any failure of the export is a warning
        why = str(exc) if isinstance(exc, SurfaceInspectError) else f"{type(exc).__name__}: {first_line(exc)}"
        reporter.warn(
            f"no ONNX export ({why}); the model scores with torch. Retry with: surfaceinspect export --model {run_dir}"
        )
        return None
    reporter.info(
        ("exported", "green"),
        f" {exported.out_dir} in {time.monotonic() - started:.1f} s (parity on {exported.parity.n_images} images)",
    )
    return modeldir.verify_sums(run_dir, expected=True).model_id
