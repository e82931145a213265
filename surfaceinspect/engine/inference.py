"""The inference core shared by score, heatmap, calibration and benchmark (numpy; torch only inside a Detector)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from surfaceinspect.analysis.calibration import Calibration
from surfaceinspect.analysis.regions import find_regions
from surfaceinspect.data.streaming import LoadedImage, iterate_images, stack_images
from surfaceinspect.data.tiling import TiledPredictor
from surfaceinspect.detectors.scorer import Scorer
from surfaceinspect.engine.checks import ImageCheck
from surfaceinspect.engine.inputs import relative_name
from surfaceinspect.storage.records import ScoreRecord, utc_now


@dataclass
class ImageResult:
    """One image after inference: its record, its map at the file's resolution, the loaded item."""

    item: LoadedImage
    record: ScoreRecord
    anomaly_map: np.ndarray | None  # float32 (H, W), raw units (same as the score)


def predict_items(
    detector: Scorer, tiler: TiledPredictor | None, items: list[LoadedImage]
) -> list[tuple[float, np.ndarray]]:
    """(score, map) per readable item: one batched forward pass, or tile by tile at the image's resolution."""
    if not items:
        return []
    if tiler is not None:
        return [tiler.predict(item.image) for item in items if item.image is not None]
    scores, maps = detector.predict_arrays(stack_images(items))
    return [(float(score), maps[i]) for i, score in enumerate(scores.tolist())]


def run_inference(
    paths: Sequence[Path],
    root: Path,
    detector: Scorer,
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
    for batch in batches:
        yield from score_batch(
            batch,
            [relative_name(item.path, root) for item in batch],
            detector,
            tiler,
            calibration,
            full_resolution_maps=full_resolution_maps,
            model_id=model_id,
            runtime=runtime,
            checks=checks,
        )


def score_batch(
    batch: Sequence[LoadedImage],
    names: Sequence[str],
    detector: Scorer,
    tiler: TiledPredictor | None,
    calibration: Calibration | None,
    *,
    full_resolution_maps: bool = True,
    model_id: str | None = None,
    runtime: str | None = None,
    checks: Sequence[ImageCheck] = (),
) -> Iterator[ImageResult]:
    """The records of one batch of loaded images (``names``: their record paths), one forward pass.

    What :func:`run_inference` does per batch; ``serve`` calls it with the images of its requests.
    """
    threshold = calibration.image_threshold if calibration is not None else None
    readable = [item for item in batch if item.image is not None]
    predictions = predict_items(detector, tiler, readable)
    position = 0
    for item, name in zip(batch, names, strict=True):
        record = ScoreRecord(
            path=name, verdict="error", model_id=model_id, threshold=threshold, runtime=runtime, time=utc_now()
        )
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
