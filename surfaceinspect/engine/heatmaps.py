"""heatmap: overlays and a gallery of a folder of images."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from surfaceinspect.analysis.calibration import Calibration
from surfaceinspect.data.sharding import Shard
from surfaceinspect.engine.inference import ImageResult
from surfaceinspect.engine.loading import LoadedModel
from surfaceinspect.engine.scoring import ScoreSummary, score_folder
from surfaceinspect.storage.outputs import lock_output, prepare_output_dir
from surfaceinspect.storage.records import format_score, utc_now
from surfaceinspect.ui import Reporter


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


def overlay_image(result: ImageResult, calibration: Calibration, opacity: float | None = None) -> np.ndarray:
    """The overlay of one scored image (uint8 RGB at its own resolution), as ``heatmap`` writes it.

    ``result`` must be readable and scored with ``keep_original`` (its ``item.original`` is the picture).
    """
    from surfaceinspect.analysis.rendering import DEFAULT_OPACITY, render_overlay

    record = result.record
    if result.anomaly_map is None or result.item.original is None or record.verdict not in ("good", "defect"):
        raise ValueError(f"{record.path}: no overlay for an image without a verdict ({record.error or 'unread'})")
    # Outlined: exactly the regions the record counts (those of a defect, at the pixel threshold).
    regions = result.anomaly_map >= calibration.pixel_threshold
    return render_overlay(
        result.item.original,
        calibration.normalize_map(result.anomaly_map),
        label=f"score {format_score(record.score)}  threshold {format_score(record.threshold)}",
        verdict=record.verdict,
        alpha=DEFAULT_OPACITY if opacity is None else opacity,
        outline=regions if record.verdict == "defect" else np.zeros_like(regions),
    )


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

    ``out_dir`` follows the output rules (:mod:`surfaceinspect.storage.outputs`): never the input folder,
    a dedicated subfolder of it at most. ``index.html`` lists unreadable files too, shows the
    model, thresholds and source folder (and the shard, with ``shard``), and is written even
    when the run is interrupted. ``out_dir`` is locked while it is written (:func:`lock_output`).
    """
    from surfaceinspect.analysis.rendering import save_png, write_index_html
    from surfaceinspect.storage.atomic import atomic_open

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
        overlay = overlay_image(result, calibration, opacity)
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
