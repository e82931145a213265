"""DRAEM anomaly synthesis: Perlin mask x augmented texture, blended into a good image.

Runs in DataLoader workers (numpy/OpenCV/PIL per sample), off the training hot path. Every sample
is a pure function of (seed, global sample index = step * batch_size + position in batch), so a
resumed run sees exactly the samples the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import Dataset, Sampler

from surfaceinspect.detectors.draem.perlin import crack_mask, edge_distance, perlin_mask, perlin_noise
from surfaceinspect.detectors.draem.sources import AnomalySource

# ---------------------------------------------------------------------------------------------
# Texture augmentation: the paper's set of 10 ops (parameter ranges of the authors' imgaug setup).


def _gamma(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gammas = rng.uniform(0.5, 2.0, size=3)  # per channel, as GammaContrast(per_channel=True)
    x = img.astype(np.float32) / 255.0
    return (np.power(x, gammas[None, None, :]) * 255.0 + 0.5).astype(np.uint8)


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mul, add = rng.uniform(0.8, 1.2), rng.uniform(-30.0, 30.0)
    return np.clip(img.astype(np.float32) * mul + add, 0, 255).astype(np.uint8)


def _sharpness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(rng.uniform(0.0, 2.0)))


def _hue_saturation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int16)
    dh, ds = rng.uniform(-50.0, 50.0, size=2)  # imgaug units (hue 0..255) -> OpenCV hue 0..179
    hsv[..., 0] = (hsv[..., 0] + round(dh * 180.0 / 255.0)) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + round(ds), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _solarize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:  # Solarize(0.5, ...): applied to half of the images
        return img
    threshold = rng.uniform(32.0, 128.0)
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8)


def _posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = int(rng.integers(1, 9))
    return np.asarray(ImageOps.posterize(Image.fromarray(img), bits))


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (255 - img).astype(np.uint8)


def _autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.autocontrast(Image.fromarray(img)))


def _equalize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.equalize(Image.fromarray(img)))


def rotate_image(image: np.ndarray, angle_deg: float) -> np.ndarray:
    """``image`` turned by ``angle_deg`` about its centre, corners filled by reflection (same size)."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle_deg, 1.0)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Reflect instead of imgaug's black fill: black corners would be an extra, unintended pattern.
    return rotate_image(img, rng.uniform(-45.0, 45.0))


AUGMENT_OPS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    _gamma,
    _brightness,
    _sharpness,
    _hue_saturation,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
    _rotate,
)


def augment_texture(texture: np.ndarray, rng: np.random.Generator, n_ops: int = 3) -> np.ndarray:
    """Apply ``n_ops`` distinct random ops (random order) to a float (H, W, 3) texture in [0, 1]."""
    img = (np.clip(texture, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    for k in rng.choice(len(AUGMENT_OPS), size=min(n_ops, len(AUGMENT_OPS)), replace=False):
        img = np.ascontiguousarray(AUGMENT_OPS[int(k)](img, rng))
    return img.astype(np.float32) / 255.0


def blend(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """I_a = (1 - M) I + (1 - beta) M I + beta M A  (paper eq. 1); arrays (H, W, C), mask (H, W)."""
    m = mask[..., None]
    return (1.0 - m) * image + (1.0 - beta) * m * image + beta * m * texture


@dataclass
class SynthesisParams:
    """The synthesis hyperparameters (a picklable subset of DraemConfig)."""

    anomaly_prob: float = 0.5
    opacity_range: tuple[float, float] = (0.1, 1.0)
    perlin_scale_range: tuple[int, int] = (0, 5)
    perlin_threshold: float = 0.5
    augment_ops: int = 3
    grayscale: bool = False  # training images are grey: make the textures grey too
    crack_prob: float = 0.0  # share of anomalies with a thin crack-like mask instead of a Perlin blob
    patch_prob: float = 0.0  # share of anomalies that are a region of changed surface finish and brightness
    rotate_prob: float = 0.0  # share of good images rotated by an angle in (-90, 90) before synthesis
    crack_fill: str = "texture"  # texture: filled from the anomaly source; dark: a darkened groove


def surface_patch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A large region whose surface finish and brightness differ: an uneven-surface anomaly, no new texture.

    The region is a band cut off by a gently curved line across the image (half the time) or a
    low-frequency Perlin blob; inside it the image is blurred (its fine grain smoothed away) and its
    brightness changed by 10-35 %. The rim is soft over a few pixels. Label: the region.
    """
    h, w = image.shape[:2]
    short = min(h, w)
    warp = perlin_noise((h, w), (2.0, 2.0), rng, float(rng.uniform(-90.0, 90.0)))
    if rng.random() < 0.5:
        theta = rng.uniform(0.0, 2.0 * math.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        side = (math.cos(theta) * (xs - w / 2.0) + math.sin(theta) * (ys - h / 2.0)) / short
        field = side - float(rng.uniform(0.0, 0.4)) + 0.05 * warp  # keeps 10-50 % of the image
    else:
        a = int(rng.integers(1, 3))
        field = perlin_noise((h, w), (2.0**a, 2.0**a), rng, float(rng.uniform(-90.0, 90.0))) - 0.3
    # Measured in pixels from the edge, so the rim is 1-4 px wide wherever the field is flat or steep.
    weight = np.clip(edge_distance(field) / float(rng.uniform(1.0, 4.0)) + 0.5, 0.0, 1.0)[..., None]
    sigma = float(rng.uniform(0.5, 2.5)) * short / 128.0
    gain = float(rng.uniform(0.65, 0.9) if rng.random() < 0.5 else rng.uniform(1.1, 1.35))
    changed = cv2.GaussianBlur(image, (0, 0), sigma) * gain
    out = np.clip((1.0 - weight) * image + weight * changed, 0.0, 1.0).astype(np.float32)
    return out, (weight[..., 0] > 0.5).astype(np.float32)


def dark_groove(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` darkened along ``mask`` by 30-80 %, with a soft 1-px edge: the shadow of an open crack."""
    soft = np.maximum(cv2.GaussianBlur(mask, (0, 0), 0.7), mask)[..., None]
    depth = float(rng.uniform(0.3, 0.8))
    return np.clip(image * (1.0 - depth * soft), 0.0, 1.0).astype(np.float32)


def synthesize(
    image: np.ndarray, source: AnomalySource, params: SynthesisParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One training pair from a float (H, W, 3) image: (augmented image, mask (H, W) in {0, 1})."""
    shape = (image.shape[0], image.shape[1])
    if rng.random() >= params.anomaly_prob:
        return image, np.zeros(shape, dtype=np.float32)
    # The extra draws happen only when a variant is enabled: with all three at 0 every sample is
    # exactly what it was before they existed.
    kind = rng.random() if params.patch_prob + params.crack_prob > 0.0 else 1.0
    if kind < params.patch_prob:
        return surface_patch(image, rng)
    crack = kind < params.patch_prob + params.crack_prob
    if crack:
        mask = crack_mask(shape, rng)
    else:
        mask = perlin_mask(shape, rng, params.perlin_scale_range, params.perlin_threshold)
    if not mask.any():  # as in the reference code: an empty Perlin mask leaves the sample normal
        return image, mask
    if crack and params.crack_fill == "dark":
        return dark_groove(image, mask, rng), mask
    texture = augment_texture(source.sample(rng, shape), rng, params.augment_ops)
    if params.grayscale:
        texture = np.repeat(texture.mean(axis=2, keepdims=True), 3, axis=2)
    beta = float(rng.uniform(*params.opacity_range))
    return blend(image, texture, mask, beta).astype(np.float32), mask


class EpochPermutation:
    """Image order: a fresh permutation per epoch, derived from (seed, epoch) alone."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, np.arange(n)

    def __call__(self, global_index: int) -> int:
        epoch, pos = divmod(global_index, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, 0, epoch]).permutation(self.n)
        return int(self._perm[pos])


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` window of ``image`` (H, W, C); sides shorter than ``size`` are kept whole."""
    h, w = image.shape[:2]
    y0 = int(rng.integers(0, h - size + 1)) if h > size else 0
    x0 = int(rng.integers(0, w - size + 1)) if w > size else 0
    return image[y0 : y0 + size, x0 : x0 + size]


class SynthesisDataset(Dataset):
    """Map-style dataset over *global sample indices* (step * batch_size + j); endless."""

    def __init__(
        self,
        images: np.ndarray,
        source: AnomalySource,
        params: SynthesisParams,
        seed: int,
        crop: int = 0,
    ) -> None:
        # images: uint8 (N, H, W, 3) numpy (shared with workers copy-on-write after fork).
        self.images = images
        self.source = source
        self.params = params
        self.seed = seed
        self.crop = crop  # > 0: each sample is a random crop x crop window of its image
        self.order = EpochPermutation(len(images), seed)

    def __len__(self) -> int:
        return 2**62  # indices come from GlobalIndexSampler

    def __getitem__(self, global_index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 1, global_index])
        image = self.images[self.order(global_index)]
        if self.crop:
            image = random_crop(image, self.crop, np.random.default_rng([self.seed, 2, global_index]))
        image = image.astype(np.float32) / 255.0
        if self.params.rotate_prob > 0.0:
            # The authors' augmentation of the good image (30 % of samples, angle in (-90, 90)),
            # from its own random stream so that the synthesis draws stay the same.
            rot = np.random.default_rng([self.seed, 3, global_index])
            if rot.random() < self.params.rotate_prob:
                image = rotate_image(image, float(rot.uniform(-90.0, 90.0)))
        augmented, mask = synthesize(image, self.source, self.params, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "augmented": torch.from_numpy(np.ascontiguousarray(augmented.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask[None]),
        }


class GlobalIndexSampler(Sampler[int]):
    """Yields global sample indices from ``start`` on, without end (the trainer stops it)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        i = self.start
        while True:
            yield i
            i += 1

    def __len__(self) -> int:  # pragma: no cover - endless by design
        return 2**62


def worker_init(_: int) -> None:
    """Keep each DataLoader worker single-threaded: the cores belong to the training step."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def is_grayscale(images: np.ndarray, sample: int = 32) -> bool:
    """True when (a sample of) the uint8 (N, H, W, 3) images have identical channels."""
    idx = np.linspace(0, len(images) - 1, num=min(sample, len(images))).astype(int)
    sub = images[idx].astype(np.int16)
    return bool(np.abs(sub[..., 0] - sub[..., 1]).max() <= 2 and np.abs(sub[..., 1] - sub[..., 2]).max() <= 2)


def mask_fraction(mask: np.ndarray) -> float:
    """Share of anomalous pixels (for statistics)."""
    return float(mask.mean()) if mask.size else math.nan
