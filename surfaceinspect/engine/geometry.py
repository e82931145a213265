"""Geometry of the training images: aspect ratios, the network input size, the profile hint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from surfaceinspect.config import CommonConfig, RunConfig, list_profiles, resolve_keep_aspect
from surfaceinspect.data.imageio import image_size, read_image, resize_image
from surfaceinspect.errors import DatasetError
from surfaceinspect.ui import Reporter

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


def aspect_summary(paths: Sequence[Path]) -> dict[str, Any]:
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
            grey = resize_image(read_image(path), side).mean(axis=0, dtype=np.float64)
        except Exception:  # noqa: BLE001 - unreadable files are reported when the images are read
            continue
        spread = grey.std(ddof=1)  # as torch.std
        if float(spread) > 1e-6:  # a flat image has no pattern to compare
            rows.append((grey - grey.mean()) / spread)
    n = len(rows)
    if n < 4:
        return None
    common = float(np.stack(rows).mean(axis=0).var())
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


def geometry_text(common: CommonConfig) -> str:
    height, width = common.input_hw()
    if common.tiling.enabled:
        scale = f", images scaled by {common.tiling.scale:g}" if common.tiling.scale != 1.0 else ""
        return f"tiles of {height}x{width} (H x W), overlap {common.tiling.overlap:g}{scale}"
    return f"{height}x{width} (H x W)"
