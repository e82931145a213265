"""Compose README's picture from a ``surfaceinspect heatmap`` output folder: its overlays as the gallery shows them.

    python benchmarks/readme_figure.py GALLERY_DIR OUT.jpg TITLE [NAME ...]

The overlays are heatmap's own PNGs (verdict, score and threshold are in each caption); this script only
lays them out in rows under a header bar like the gallery page's, since no browser is available here to
take a screenshot of index.html itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

ROW_HEIGHT = 300
WIDTH = 1200
GAP = 12
HEADER = 56
BACKGROUND = (247, 245, 244)  # BGR of the gallery's --bg
BAR = (48, 35, 29)  # BGR of the gallery's header #1d2330


def _rows(images: list[np.ndarray]) -> list[list[np.ndarray]]:
    rows: list[list[np.ndarray]] = [[]]
    used = GAP
    for image in images:
        scaled = cv2.resize(image, (round(image.shape[1] * ROW_HEIGHT / image.shape[0]), ROW_HEIGHT))
        if used + scaled.shape[1] + GAP > WIDTH and rows[-1]:
            rows.append([])
            used = GAP
        rows[-1].append(scaled)
        used += scaled.shape[1] + GAP
    return rows


def compose(gallery: Path, title: str, names: list[str]) -> np.ndarray:
    """The figure: a header bar with the counts, then the overlays in rows."""
    paths = [gallery / f"{n}.png" for n in names] if names else sorted(gallery.glob("*.png"))
    images = [cv2.imread(str(p)) for p in paths]
    rows = _rows([i for i in images if i is not None])
    canvas = np.full((HEADER + len(rows) * (ROW_HEIGHT + GAP) + GAP, WIDTH, 3), BACKGROUND, np.uint8)
    canvas[:HEADER] = BAR
    cv2.putText(canvas, title, (24, 36), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2, cv2.LINE_AA)
    y = HEADER + GAP
    for row in rows:
        x = GAP
        for image in row:
            canvas[y : y + ROW_HEIGHT, x : x + image.shape[1]] = image
            x += image.shape[1] + GAP
        y += ROW_HEIGHT + GAP
    return canvas


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    figure = compose(Path(argv[0]), argv[2], argv[3:])
    ok = cv2.imwrite(argv[1], figure, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
