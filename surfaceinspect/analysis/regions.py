"""Defect regions: connected components of an anomaly map above a threshold."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["Region", "find_regions"]


@dataclass(frozen=True)
class Region:
    """One connected defect region.

    ``bbox`` is ``(x, y, width, height)`` in pixels of the map (x = column, y = row);
    ``peak`` is the highest map value inside the region, in the map's units.
    """

    area: int
    bbox: tuple[int, int, int, int]
    peak: float

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return {"area": self.area, "bbox": list(self.bbox), "peak": self.peak}


def find_regions(anomaly_map: np.ndarray, threshold: float, min_area: int = 1) -> list[Region]:
    """8-connected components of ``anomaly_map >= threshold`` with at least ``min_area`` pixels.

    Sorted by area, largest first (ties: higher peak first). NaN pixels never belong to a region.
    """
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"anomaly_map must be HxW, got shape {amap.shape}")
    binary = (amap >= threshold).astype(np.uint8)  # NaN >= t is False
    if not binary.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    # Per-component maximum in one vectorised pass (label 0 is the background).
    peaks = np.full(n, -np.inf, dtype=np.float32)
    np.maximum.at(peaks, labels.ravel(), amap.ravel())
    ids = np.arange(1, n)
    ids = ids[stats[ids, cv2.CC_STAT_AREA] >= min_area]
    ids = ids[np.lexsort((-peaks[ids], -stats[ids, cv2.CC_STAT_AREA]))]  # area desc, then peak desc
    # Plain Python ints/floats (via tolist) keep this fast even for noisy maps with many regions.
    rows = stats[ids].tolist()
    return [
        Region(area=r[cv2.CC_STAT_AREA], bbox=(r[0], r[1], r[2], r[3]), peak=pk)
        for r, pk in zip(rows, peaks[ids].astype(np.float64).tolist(), strict=True)
    ]
