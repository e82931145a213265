"""A small generated inspection dataset in MVTec layout (for the demo, tests and quick benchmarks).

Good images are a brushed-metal-like surface (directional grain, slow shading, sensor noise) that
varies from image to image; defective images add scratches, dents (dark blobs) or stains, with
ground-truth masks. Everything is derived from one seed, so the dataset is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEFECT_TYPES = ("scratch", "dent", "stain")


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """One good image: float32 HxWx3 in [0, 1]."""
    grain = rng.normal(0.0, 1.0, (size, size * 2)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), sigmaX=6.0, sigmaY=0.6)[:, :size]
    grain = grain / (np.abs(grain).max() + 1e-6)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    shading = 0.08 * np.cos(angle) * (xx - 0.5) + 0.08 * np.sin(angle) * (yy - 0.5)
    base = 0.55 + rng.uniform(-0.04, 0.04) + shading + 0.12 * grain
    base = base + rng.normal(0.0, 0.015, base.shape).astype(np.float32)
    tint = np.array([1.0, 0.98, 0.94], np.float32) * rng.uniform(0.97, 1.03)
    return np.clip(base[..., None] * tint, 0.0, 1.0).astype(np.float32)


def _defect_mask(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    if kind == "scratch":
        x0, y0 = rng.integers(size // 8, size - size // 8, 2)
        length = rng.uniform(0.25, 0.5) * size
        angle = rng.uniform(0, np.pi)
        x1, y1 = int(x0 + length * np.cos(angle)), int(y0 + length * np.sin(angle))
        cv2.line(mask, (int(x0), int(y0)), (x1, y1), 1, thickness=max(2, size // 64))
    elif kind == "dent":
        for _ in range(rng.integers(1, 3)):
            c = rng.integers(size // 6, size - size // 6, 2)
            axes = (int(rng.integers(size // 24, size // 10)), int(rng.integers(size // 24, size // 10)))
            cv2.ellipse(mask, (int(c[0]), int(c[1])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:  # stain
        c = rng.integers(size // 5, size - size // 5, 2)
        radius = int(rng.integers(size // 12, size // 7))
        cv2.circle(mask, (int(c[0]), int(c[1])), radius, 1, -1)
        noise = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / 40)
        mask = (mask.astype(bool) & (noise > np.median(noise) * 0.98)).astype(np.uint8)
    return mask.astype(bool)


def _apply_defect(img: np.ndarray, mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    if kind == "scratch":
        out[mask] = np.clip(out[mask] + rng.choice([-0.35, 0.35]), 0, 1)
    elif kind == "dent":
        out[mask] = out[mask] * 0.45
    else:
        colour = np.array([0.55, 0.35, 0.15], np.float32)
        out[mask] = 0.4 * out[mask] + 0.6 * colour
    return out


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor((np.clip(image, 0, 1) * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"could not write {path}")


def make_dataset(
    root: Path,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect_per_type: int = 4,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write an MVTec-layout dataset (train/good, test/good, test/<type>, ground_truth) under ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _save(root / "train" / "good" / f"{i:03d}.png", _surface(rng, size))
    for i in range(n_test_good):
        _save(root / "test" / "good" / f"{i:03d}.png", _surface(rng, size))
    for kind in DEFECT_TYPES:
        for i in range(n_test_defect_per_type):
            mask = _defect_mask(rng, size, kind)
            image = _apply_defect(_surface(rng, size), mask, kind, rng)
            _save(root / "test" / kind / f"{i:03d}.png", image)
            gt = root / "ground_truth" / kind / f"{i:03d}_mask.png"
            gt.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(gt), mask.astype(np.uint8) * 255)
    return root
