"""Connected defect regions on drawn maps."""

from __future__ import annotations

import numpy as np
import pytest

from surfaceinspect.analysis.regions import Region, find_regions


def _drawn_map() -> np.ndarray:
    m = np.full((12, 16), 0.1, np.float32)
    m[1:4, 2:6] = 0.8  # 3 x 4 rectangle, area 12
    m[2, 4] = 0.95  # its peak
    m[8, 8] = 0.6  # diagonal pair: one region with 8-connectivity
    m[9, 9] = 0.5  # exactly at the threshold: included
    m[0, 15] = 0.7  # single pixel
    m[11, 0] = 0.49  # just below the threshold: excluded
    return m


def test_regions_area_bbox_peak_sorted():
    regions = find_regions(_drawn_map(), threshold=0.5)
    assert regions == [
        Region(area=12, bbox=(2, 1, 4, 3), peak=pytest.approx(0.95)),
        Region(area=2, bbox=(8, 8, 2, 2), peak=pytest.approx(0.6)),
        Region(area=1, bbox=(15, 0, 1, 1), peak=pytest.approx(0.7)),
    ]


def test_regions_min_area_and_empty():
    assert [r.area for r in find_regions(_drawn_map(), 0.5, min_area=2)] == [12, 2]
    assert find_regions(_drawn_map(), threshold=0.99) == []
    assert find_regions(np.full((5, 7), np.nan), threshold=0.0) == []


def test_region_to_dict():
    r = find_regions(_drawn_map(), 0.5)[0]
    assert r.to_dict() == {"area": 12, "bbox": [2, 1, 4, 3], "peak": pytest.approx(0.95)}


def test_regions_reject_non_2d():
    with pytest.raises(ValueError, match="HxW"):
        find_regions(np.zeros((2, 3, 3)), 0.5)
