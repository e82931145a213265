"""score: a folder of images to records and a summary."""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from surfaceinspect.analysis.drift import DEFAULT_WINDOW, DriftMonitor
from surfaceinspect.data.imageio import supported_suffixes
from surfaceinspect.data.sharding import Shard
from surfaceinspect.engine.checks import reliability_checks
from surfaceinspect.engine.inference import ImageResult, run_inference
from surfaceinspect.engine.inputs import MAX_LISTED_FAILURES, find_images
from surfaceinspect.engine.loading import LoadedModel
from surfaceinspect.errors import EXIT_DEFECT, EXIT_OK, EXIT_UNREADABLE, DatasetError
from surfaceinspect.storage.records import ScoreRecord
from surfaceinspect.ui import Reporter


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
    end. Each ``drift_window`` good verdicts are checked for drift (:mod:`surfaceinspect.analysis.drift`).
    With ``shard`` only the images of that shard are scored (see :mod:`surfaceinspect.data.sharding`);
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
