"""Anomaly sources: where the texture pasted into synthetic anomalies comes from.

The paper uses the DTD texture set (5640 photos). A user can point ``draem.anomaly_source`` at any
folder (their DTD copy, ImageNet crops, ...). Without one, a built-in source is used, so nothing
has to be downloaded. Which built-in is the default was decided by measurement on MTD
(BENCHMARKS.md, section 3): ``self``; all of them stay selectable by name.

Every source is a picklable object with ``sample(rng, size) -> float32 (H, W, 3) in [0, 1]``, where
``size`` is S (square) or (H, W); all randomness comes from ``rng`` so a sample is reproducible from
its seed. Procedural patterns are scaled to the short side (like the Perlin masks), so a long strip
gets the same pattern sizes as a square image of its short side; square sizes give exactly the
textures they gave before non-square support.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from surfaceinspect.data.imageio import discover_images, read_image_uint8
from surfaceinspect.detectors.draem.config import BUILTIN_SOURCES, DEFAULT_BUILTIN
from surfaceinspect.detectors.draem.perlin import as_hw, fractal_noise, perlin_noise
from surfaceinspect.errors import ConfigError, DatasetError, ImageReadError


class AnomalySource:
    """Base class: ``sample`` returns one texture image (H, W, 3) float32 in [0, 1]."""

    name = "base"

    def sample(self, rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
        raise NotImplementedError


def crop_to_aspect(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The largest centred crop of ``img`` with the aspect ratio of ``shape`` (H, W); ``img`` if it has it."""
    h, w = img.shape[:2]
    th, tw = shape
    ch, cw = (h, max(1, round(h * tw / th))) if w * th >= h * tw else (max(1, round(w * th / tw)), w)
    if (ch, cw) == (h, w):
        return img
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return img[y0 : y0 + ch, x0 : x0 + cw]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


class FractalNoiseSource(AnomalySource):
    """Procedural colour textures: multi-octave Perlin noise mapped between random colours.

    Two independent noise fields (one for colour, one for brightness) at random base scales,
    orientations and roughness give cloud-, marble- and grain-like textures of any frequency.
    """

    name = "fractal"

    def sample(self, rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
        shape = as_hw(size)
        out = np.zeros((*shape, 3), dtype=np.float32)
        base = 2.0 ** rng.uniform(0.0, 4.0, size=2)
        octaves = int(rng.integers(1, 6))
        persistence = float(rng.uniform(0.35, 0.8))
        t = fractal_noise(shape, (base[0], base[1]), rng, octaves, persistence, float(rng.uniform(0, 180)))
        t = np.clip(t * rng.uniform(1.0, 3.0) + 0.5, 0.0, 1.0)[..., None]
        c0, c1 = _random_colour(rng), _random_colour(rng)
        out[:] = c0 * (1.0 - t) + c1 * t
        # A second, finer field modulates brightness so the texture is never a pure two-colour ramp.
        fine = 2.0 ** rng.uniform(2.0, 5.0, size=2)
        g = fractal_noise(shape, (fine[0], fine[1]), rng, 3, 0.5, float(rng.uniform(0, 180)))
        out *= np.clip(1.0 + g * rng.uniform(0.2, 1.0), 0.0, 2.0)[..., None]
        return np.clip(out, 0.0, 1.0)


class StructuredSource(AnomalySource):
    """Procedural structured textures: stripes, checkers, grids, dots, waves and cells, with noise."""

    name = "structured"

    def sample(self, rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
        h, w = as_hw(size)
        short = min(h, w)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0.0, math.pi)
        u = (np.cos(angle) * xx - np.sin(angle) * yy) / short
        v = (np.sin(angle) * xx + np.cos(angle) * yy) / short
        freq = float(2.0 ** rng.uniform(1.0, 5.5))
        kind = int(rng.integers(0, 6))
        if kind == 0:  # stripes with a random duty cycle
            t = ((u * freq) % 1.0 < rng.uniform(0.2, 0.8)).astype(np.float32)
        elif kind == 1:  # checkerboard
            t = ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
        elif kind == 2:  # grid lines
            width = rng.uniform(0.05, 0.3)
            t = (((u * freq) % 1.0 < width) | ((v * freq) % 1.0 < width)).astype(np.float32)
        elif kind == 3:  # dots
            du, dv = (u * freq) % 1.0 - 0.5, (v * freq) % 1.0 - 0.5
            t = (du * du + dv * dv < rng.uniform(0.02, 0.2)).astype(np.float32)
        elif kind == 4:  # waves: sinusoid warped by noise
            warp = perlin_noise((h, w), (4.0, 4.0), rng) * rng.uniform(0.0, 3.0)
            t = 0.5 + 0.5 * np.sin(2.0 * math.pi * (u * freq + warp))
        else:  # cells: distance to random points (Worley-like), quantised into patches
            n = int(rng.integers(4, 64))  # cells per short-side square; a strip gets proportionally more
            pts = rng.uniform(0, (h, w), size=(round(n * h * w / short**2), 2)).astype(np.float32)
            d = np.full((h, w), np.inf, dtype=np.float32)
            for py, px in pts:
                d = np.minimum(d, (yy - py) ** 2 + (xx - px) ** 2)
            t = np.sqrt(d) / (short / math.sqrt(n))
            t = np.clip(t, 0.0, 1.0)
        c0, c1 = _random_colour(rng), _random_colour(rng)
        out = c0 * (1.0 - t[..., None]) + c1 * t[..., None]
        noise = rng.normal(0.0, rng.uniform(0.0, 0.15), size=(h, w, 1)).astype(np.float32)
        return np.clip(out + noise, 0.0, 1.0)


class SelfSource(AnomalySource):
    """Heavily transformed crops of the training images themselves.

    A random crop (5-40% of the area) is scaled up to the full size, flipped/rotated and
    colour-shifted, so the texture is "foreign" in scale, orientation and tone while staying in
    the image domain. On non-square images a crop turned by 90 degrees is cut to the target's
    aspect before scaling (instead of being stretched by the aspect squared).
    """

    name = "self"

    def __init__(self, images: np.ndarray) -> None:
        # images: uint8 (N, H, W, 3); shared with DataLoader workers through fork.
        self.images = images

    def sample(self, rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
        th, tw = as_hw(size)
        img = self.images[int(rng.integers(0, len(self.images)))]
        h, w = img.shape[:2]
        frac = math.sqrt(rng.uniform(0.05, 0.4))
        ch, cw = max(4, int(h * frac)), max(4, int(w * frac))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[y0 : y0 + ch, x0 : x0 + cw]
        crop = np.rot90(crop, int(rng.integers(0, 4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = crop_to_aspect(crop, (th, tw))  # square images give square crops: unchanged
        out = cv2.resize(np.ascontiguousarray(crop), (tw, th), interpolation=cv2.INTER_LINEAR)
        out = out.astype(np.float32) / 255.0
        # Colour shift: per-channel gain and offset.
        out = out * rng.uniform(0.5, 1.5, size=3).astype(np.float32) + rng.uniform(-0.3, 0.3, size=3).astype(np.float32)
        return np.clip(out, 0.0, 1.0)


class FolderSource(AnomalySource):
    """Images from a folder (recursive), e.g. a copy of DTD. Decoded images are cached per process."""

    name = "folder"

    def __init__(self, root: str | Path, cache_size: int = 512) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"draem.anomaly_source={str(root)!r} is not a folder; use a folder of images or builtin")
        self.paths = discover_images(self.root)
        if not self.paths:
            raise ConfigError(f"draem.anomaly_source={str(root)!r} holds no images; add texture images or use builtin")
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[int, tuple[int, int]], np.ndarray] = OrderedDict()

    def _load(self, index: int, shape: tuple[int, int]) -> np.ndarray | None:
        key = (index, shape)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            data = read_image_uint8(self.paths[index])
        except ImageReadError:
            return None
        h, w = shape
        if h != w:
            # Square targets keep the paper's plain resize (DTD photos squashed to a square; square
            # results stay reproducible). A 1:8 strip would smear a photo 8x, so crop to its aspect first.
            data = crop_to_aspect(data, shape)
        img = cv2.resize(data, (w, h), interpolation=cv2.INTER_AREA)
        self._cache[key] = img
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return img

    def sample(self, rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
        for _ in range(10):  # skip unreadable files (bounded, so a folder of broken files fails loudly)
            img = self._load(int(rng.integers(0, len(self.paths))), as_hw(size))
            if img is not None:
                return img.astype(np.float32) / 255.0
        raise DatasetError(f"draem.anomaly_source {self.root}: images cannot be decoded; check the folder")


def make_source(spec: str, train_images: np.ndarray | None = None) -> AnomalySource:
    """Build the source named by ``draem.anomaly_source`` (a builtin name or a folder path).

    ``train_images`` (uint8 (N, H, W, 3)) is needed by the ``self`` source only.
    """
    if spec == "builtin":
        spec = DEFAULT_BUILTIN
    if spec == "fractal":
        return FractalNoiseSource()
    if spec == "structured":
        return StructuredSource()
    if spec == "self":
        if train_images is None:
            raise ValueError("the 'self' anomaly source needs the training images")
        return SelfSource(train_images)
    if spec in BUILTIN_SOURCES:  # pragma: no cover - guarded by BUILTIN_SOURCES staying in sync
        raise ValueError(f"unhandled builtin source {spec}")
    return FolderSource(spec)
