"""Perlin (gradient) noise for any image size, evaluated directly at rotated coordinates.

The authors' code draws noise on a power-of-two grid and rotates the *thresholded image* with an
affine warp, which needs sizes divisible by the noise period and leaves empty (never-anomalous)
corners. Here the noise is a continuous function, so we evaluate it at rotated pixel coordinates:
any size works, nothing is interpolated, and every pixel can become anomalous.

Periods count along the *short* side for both axes, so noise cells are square in pixels whatever
the aspect: a 256 x 1024 strip gets the blobs of four 256 x 256 images side by side instead of
blobs stretched 4x along the strip (on square images this is exactly the paper's convention).
"""

from __future__ import annotations

import math

import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` from a square side or an ``(H, W)`` pair."""
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def perlin_noise(
    shape: tuple[int, int],
    res: tuple[float, float],
    rng: np.random.Generator,
    angle_deg: float = 0.0,
) -> np.ndarray:
    """Perlin noise of ``shape`` (H, W), rotated by ``angle_deg``.

    ``res`` = (periods along the noise's y axis, along its x axis), both counted over the short
    side of ``shape`` (equal to the image side for square shapes). Values lie in about [-1, 1]
    (scaled by sqrt(2) like the reference implementation).
    """
    h, w = shape
    short = min(h, w)
    ry, rx = float(res[0]), float(res[1])
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5 - h / 2.0
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5 - w / 2.0
    a = math.radians(angle_deg)
    cos_a, sin_a = math.cos(a), math.sin(a)
    radius = math.hypot(h / 2.0, w / 2.0)
    # Rotated coordinates, shifted to be >= 0, in units of noise cells.
    u = (cos_a * xs - sin_a * ys + radius) * (rx / short)
    v = (sin_a * xs + cos_a * ys + radius) * (ry / short)
    gx = math.ceil(2.0 * radius * rx / short) + 2
    gy = math.ceil(2.0 * radius * ry / short) + 2
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(gy, gx)).astype(np.float32)
    grad_x, grad_y = np.cos(angles), np.sin(angles)
    j0 = np.floor(u).astype(np.int64)
    i0 = np.floor(v).astype(np.int64)
    fu = (u - j0).astype(np.float32)
    fv = (v - i0).astype(np.float32)

    def corner(di: int, dj: int) -> np.ndarray:
        ii, jj = i0 + di, j0 + dj
        return grad_x[ii, jj] * (fu - dj) + grad_y[ii, jj] * (fv - di)

    tu, tv = _fade(fu), _fade(fv)
    n0 = corner(0, 0) + tu * (corner(0, 1) - corner(0, 0))
    n1 = corner(1, 0) + tu * (corner(1, 1) - corner(1, 0))
    return (math.sqrt(2.0) * (n0 + tv * (n1 - n0))).astype(np.float32)


def fractal_noise(
    shape: tuple[int, int],
    res: tuple[float, float],
    rng: np.random.Generator,
    octaves: int = 4,
    persistence: float = 0.5,
    angle_deg: float = 0.0,
) -> np.ndarray:
    """Sum of ``octaves`` Perlin layers, each twice the frequency and ``persistence`` times the amplitude."""
    out = np.zeros(shape, dtype=np.float32)
    amp, total = 1.0, 0.0
    for k in range(octaves):
        f = 2.0**k
        out += amp * perlin_noise(shape, (res[0] * f, res[1] * f), rng, angle_deg)
        total += amp
        amp *= persistence
    return out / total


def perlin_mask(
    size: int | tuple[int, int],
    rng: np.random.Generator,
    scale_range: tuple[int, int] = (0, 5),
    threshold: float = 0.5,
) -> np.ndarray:
    """A binary anomaly mask of ``size`` (S or (H, W)), float32 in {0, 1}, as in DRAEM's synthesis.

    Periods 2^a x 2^b over the short side with a, b uniform in ``scale_range`` (inclusive), rotation
    uniform in (-90, 90) degrees, thresholded at ``threshold``. The mask may be empty (then the
    sample is normal).
    """
    a = int(rng.integers(scale_range[0], scale_range[1] + 1))
    b = int(rng.integers(scale_range[0], scale_range[1] + 1))
    angle = float(rng.uniform(-90.0, 90.0))
    noise = perlin_noise(as_hw(size), (2.0**a, 2.0**b), rng, angle)
    return (noise > threshold).astype(np.float32)


def edge_distance(field: np.ndarray) -> np.ndarray:
    """Signed distance in pixels to the zero line of a smooth ``field`` (first order: field / |gradient|)."""
    gy, gx = np.gradient(field)
    return field / np.maximum(np.hypot(gx, gy), 1e-6)


def crack_mask(
    size: int | tuple[int, int],
    rng: np.random.Generator,
    width_range: tuple[float, float] = (1.0, 3.0),
    region_threshold: float = 0.1,
) -> np.ndarray:
    """A thin, crack-like binary mask: a band around a zero line of anisotropic Perlin noise.

    The zero lines of gradient noise are long meandering curves; the pixels within ``width / 2`` of
    one (:func:`edge_distance`) form a curve ``width_range`` pixels wide. The noise is stretched
    1-2.8x along a random direction so the curves run mostly one way, as cracks and scratches do, and
    the curve is kept only inside a low-frequency Perlin region, so a mask holds a few crack segments
    rather than a net over the whole image. May be empty.
    """
    shape = as_hw(size)
    periods = 2.0 ** rng.uniform(0.5, 2.0)
    stretch = 2.0 ** rng.uniform(0.0, 1.5)
    angle = float(rng.uniform(-90.0, 90.0))
    noise = perlin_noise(shape, (periods * stretch, periods), rng, angle)
    # A band of even width in pixels (a plain threshold on |noise| would swell into blobs where the noise is flat).
    line = np.abs(edge_distance(noise)) < 0.5 * float(rng.uniform(*width_range))
    a = int(rng.integers(0, 2))
    region = perlin_noise(shape, (2.0**a, 2.0**a), rng, float(rng.uniform(-90.0, 90.0))) > region_threshold
    return (line & region).astype(np.float32)
