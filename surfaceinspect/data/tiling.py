"""Tiled training and scoring: large images at their own resolution, in network-sized tiles.

A line-scan strip of 8000 x 1024 pixels squashed to 256 x 256 loses any defect of a few pixels.
With ``common.tiling.enabled`` the image is (optionally scaled by ``tiling.scale``, then) cut into
overlapping tiles of the network's input size. Training uses tiles sampled from the training
images; scoring runs every tile through the detector and blends the tile maps with a smooth
window into one map at the image's resolution, so no seam appears where tiles meet. The image
score is the highest tile score, so calibration, thresholds and regions work as for whole images.

Memory stays bounded: tiles are scored a batch at a time and only the stitched map (and its
weights) of the image in hand is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from surfaceinspect.config import TilingConfig
from surfaceinspect.data.imageio import read_image, resize_image
from surfaceinspect.data.streaming import decode_or_reason, ordered_map

if TYPE_CHECKING:
    import torch

    from surfaceinspect.detectors.scorer import Scorer

# Weight of a tile's outermost pixels in the blend: small but never zero, so that pixels covered
# by one tile only (image borders) keep exactly that tile's value.
_WINDOW_FLOOR = 1e-3


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``, neighbours sharing ``overlap``.

    The last tile ends flush with the image; ``length <= tile`` gives one tile at 0.
    """
    if length <= tile:
        return [0]
    step = max(1, round(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / step) + 1
    # Spread the tiles evenly so the last one ends exactly at ``length`` (equal overlaps everywhere).
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_positions(height: int, width: int, tile_hw: tuple[int, int], overlap: float) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the tiles covering a ``height x width`` image, row by row."""
    ys = tile_origins(height, tile_hw[0], overlap)
    xs = tile_origins(width, tile_hw[1], overlap)
    return [(y, x) for y in ys for x in xs]


def blend_window(height: int, width: int, overlap: float) -> np.ndarray:
    """Weights ``(height, width)`` float32: 1 inside, raised-cosine ramps over the overlap margins."""

    def ramp(n: int) -> np.ndarray:
        margin = round(n * overlap)
        w = np.ones(n, np.float32)
        if margin > 0:
            t = (np.arange(margin, dtype=np.float32) + np.float32(0.5)) / np.float32(margin)
            edge = (np.float32(0.5) - np.float32(0.5) * np.cos(np.float32(math.pi) * t)).astype(np.float32)
            w[:margin] = edge
            w[n - margin :] = np.minimum(w[n - margin :], edge[::-1])
        return np.maximum(w, np.float32(_WINDOW_FLOOR))

    return ramp(height)[:, None] * ramp(width)[None, :]


def scaled_size(height: int, width: int, tiling: TilingConfig) -> tuple[int, int]:
    """The image size after ``tiling.scale`` (at least 1 pixel per side)."""
    return max(1, round(height * tiling.scale)), max(1, round(width * tiling.scale))


def _prepare(image: np.ndarray, tile_hw: tuple[int, int], tiling: TilingConfig) -> np.ndarray:
    """Scale ``(3, H, W)`` by ``tiling.scale`` and reflect-pad it to at least one tile."""
    h, w = image.shape[-2:]
    target = scaled_size(h, w, tiling)
    if target != (h, w):
        image = resize_image(image, target)
    pad_h, pad_w = max(0, tile_hw[0] - image.shape[-2]), max(0, tile_hw[1] - image.shape[-1])
    if pad_h or pad_w:
        # Reflection keeps the texture; "edge" (replicate) where the image is too small to reflect.
        mode = "reflect" if pad_h < image.shape[-2] and pad_w < image.shape[-1] else "edge"
        image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)
    return image


class TiledPredictor:
    """Scores whole images tile by tile with a detector trained on tiles."""

    def __init__(self, detector: Scorer, tiling: TilingConfig, batch_size: int) -> None:
        self.detector = detector
        self.tiling = tiling
        self.batch_size = max(1, batch_size)
        self.tile_hw = detector.input_size
        self.window = blend_window(*self.tile_hw, tiling.overlap)

    def predict(self, image: np.ndarray) -> tuple[float, np.ndarray]:
        """Image score (the highest tile score) and the stitched map at the image's own ``(H, W)``."""
        height, width = image.shape[-2:]
        work = _prepare(image, self.tile_hw, self.tiling)
        th, tw = self.tile_hw
        positions = tile_positions(work.shape[-2], work.shape[-1], self.tile_hw, self.tiling.overlap)
        acc = np.zeros(work.shape[-2:], dtype=np.float32)
        weight = np.zeros_like(acc)
        best = -math.inf
        for start in range(0, len(positions), self.batch_size):
            chunk = positions[start : start + self.batch_size]
            tiles = np.stack([work[:, y : y + th, x : x + tw] for y, x in chunk])
            scores, maps = self.detector.predict_arrays(tiles)
            best = max(best, float(np.max(scores)))
            for (y, x), tile_map in zip(chunk, maps, strict=True):
                acc[y : y + th, x : x + tw] += tile_map * self.window
                weight[y : y + th, x : x + tw] += self.window
        scaled_h, scaled_w = scaled_size(height, width, self.tiling)
        stitched = (acc / weight)[:scaled_h, :scaled_w]
        if (scaled_h, scaled_w) != (height, width):
            # the bilinear map resize of torch's F.interpolate (align_corners=False), as at scoring
            stitched = cv2.resize(stitched, (width, height), interpolation=cv2.INTER_LINEAR)
        return best, np.ascontiguousarray(stitched, dtype=np.float32)


def _training_tiles(
    path: Path, index: int, tile_hw: tuple[int, int], tiling: TilingConfig, per_image: int, seed: int
) -> tuple[np.ndarray | None, str | None]:
    """Up to ``per_image`` random tiles of one training image as uint8 ``(n, 3, h, w)`` (seeded by its index),
    or ``(None, why)`` when it cannot be read."""
    image, reason = decode_or_reason(lambda: read_image(path))
    if image is None:
        return None, reason
    work = _prepare(image, tile_hw, tiling)
    th, tw = tile_hw
    positions = tile_positions(work.shape[-2], work.shape[-1], tile_hw, tiling.overlap)
    picks = np.random.default_rng([seed, index]).permutation(len(positions))[:per_image]
    tiles = np.stack([work[:, positions[i][0] : positions[i][0] + th, positions[i][1] : positions[i][1] + tw]
                      for i in sorted(picks)])  # fmt: skip
    return (np.clip(tiles, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), None


def load_training_tiles(
    paths: Sequence[Path], tile_hw: tuple[int, int], tiling: TilingConfig, workers: int, seed: int
) -> tuple[torch.Tensor, list[Path], list[tuple[Path, str]]]:
    """Tiles of the training images as one uint8 tensor ``(N, 3, h, w)``; returns (tiles, ok paths, failures).

    At most ``tiling.max_train_tiles`` tiles in all, spread evenly over the images.
    """
    import torch  # training only: scoring never comes here

    paths = list(paths)
    per_image = max(1, tiling.max_train_tiles // max(1, len(paths)))

    def tiles_of(index: int) -> tuple[np.ndarray | None, str | None]:
        return _training_tiles(paths[index], index, tile_hw, tiling, per_image, seed)

    chunks: list[np.ndarray] = []
    ok: list[Path] = []
    failures: list[tuple[Path, str]] = []
    read = ordered_map(tiles_of, range(len(paths)), min(workers, len(paths)), 4)
    for path, (tiles, error) in zip(paths, read, strict=True):
        if tiles is None:
            failures.append((path, error or "unreadable"))
        else:
            chunks.append(tiles)
            ok.append(path)
    if not chunks:
        return torch.empty((0, 3, *tile_hw), dtype=torch.uint8), ok, failures
    return torch.from_numpy(np.concatenate(chunks)), ok, failures
