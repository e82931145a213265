"""The frozen backbone's features for CS-Flow training: their cache (memory, disk or none) and the
normalisation statistics (per-channel or whitening) computed from them."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from surfaceinspect.errors import TrainingError

from .backbones import MultiScaleFeatures


class FeatureStore:
    """Backbone features of the training set, extracted once (``memory`` / ``disk``) or on demand (``none``)."""

    def __init__(
        self,
        extractor: MultiScaleFeatures,
        images: torch.Tensor,
        mode: str,
        batch_size: int,
        device: torch.device,
        cache_dir: str = "",
        on_progress: Any = None,
    ) -> None:
        self.extractor = extractor
        self.images = images
        self.mode = mode
        self.device = device
        self._tmpdir: Path | None = None
        self.arrays: list[Any] = []
        n = len(images)
        if mode == "none":
            return
        done = 0
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            feats = self._compute(idx)
            if not self.arrays:
                self._allocate(n, [f.shape[1:] for f in feats], cache_dir)
            self.put(start, feats)
            done += len(idx)
            if on_progress is not None:
                on_progress(done, n)
        if mode == "disk":
            for store in self.arrays:
                store.flush()

    @classmethod
    def allocated(
        cls,
        extractor: MultiScaleFeatures,
        images: torch.Tensor,
        mode: str,
        shapes: list[torch.Size],
        device: torch.device,
        cache_dir: str = "",
    ) -> FeatureStore:
        """An empty ``memory`` / ``disk`` store for the features of ``images`` (per-scale ``shapes``); fill it with
        :meth:`put`."""
        store = cls(extractor, images[:0], "none", 1, device)
        store.images, store.mode = images, mode
        store._allocate(len(images), shapes, cache_dir)
        return store

    def put(self, start: int, feats: list[torch.Tensor]) -> None:
        """Store the features of training images ``start ... start + len(feats[0]) - 1``, one tensor per scale."""
        for store, f in zip(self.arrays, feats, strict=True):
            if self.mode == "disk":
                store[start : start + len(f)] = f.numpy()
            else:
                store[start : start + len(f)].copy_(f)

    @classmethod
    def from_arrays(cls, arrays: list[torch.Tensor], device: torch.device) -> FeatureStore:
        """A store over features computed elsewhere (e.g. cached by a benchmark)."""
        store = cls.__new__(cls)
        store.mode, store.device, store._tmpdir, store.arrays = "memory", device, None, list(arrays)
        return store

    def _allocate(self, n: int, shapes: list[torch.Size], cache_dir: str) -> None:
        if self.mode == "memory":
            self.arrays = [torch.empty((n, *shape), dtype=torch.float32) for shape in shapes]
            return
        self._tmpdir = Path(tempfile.mkdtemp(prefix="csflow-features-", dir=cache_dir or None))
        self.arrays = [
            np.lib.format.open_memmap(
                self._tmpdir / f"scale{i}.npy", mode="w+", dtype=np.float32, shape=(n, *tuple(shape))
            )
            for i, shape in enumerate(shapes)
        ]

    def _compute(self, idx: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            x = self.images[idx].to(self.device, non_blocking=True).float().div_(255.0)
            feats = [f.float().cpu() for f in self.extractor(x)]
        for f in feats:
            if not torch.isfinite(f).all():
                raise TrainingError(
                    f"backbone features of training images {int(idx[0])}..{int(idx[-1])} are not finite; "
                    "check those images and the backbone weights file"
                )
        return [f.clone() for f in feats]  # clone: a normal tensor, usable by autograd

    def get(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Features of training images ``idx`` (CPU float32), one tensor per scale."""
        if self.mode == "none":
            return self._compute(idx)
        if self.mode == "disk":
            order = np.sort(idx.numpy())  # sorted reads are sequential on disk; the order is restored below
            back = np.argsort(np.argsort(idx.numpy()))
            return [torch.from_numpy(np.ascontiguousarray(a[order][back])) for a in self.arrays]
        return [a[idx] for a in self.arrays]

    def close(self) -> None:
        self.arrays = []
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def normalize_features(
    feats: list[torch.Tensor], norm: list[tuple[torch.Tensor, torch.Tensor]] | None, mode: str
) -> list[torch.Tensor]:
    """Apply ``csflow.feature_norm`` ``mode``: per scale ``(mean, std)`` or ``(mean, W)``.

    ``channel``: ``(f - mean) / std`` with both shaped ``(1, C, 1, 1)``. ``whiten``: the 1x1
    convolution ``W`` ``(C, C, 1, 1)`` applied to ``f - mean``.
    """
    if not norm:
        return feats
    if mode == "whiten":
        return [F.conv2d(f - mean, transform) for f, (mean, transform) in zip(feats, norm, strict=True)]
    return [(f - mean) / std for f, (mean, std) in zip(feats, norm, strict=True)]


def _feature_moments(
    store: FeatureStore, n: int, batch_size: int, full_covariance: bool
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per scale, over every position of the ``n`` stored images: the float64 sum of the feature
    vectors, their second moment (per-channel sum of squares, or ``X^T X`` with ``full_covariance``)
    and the number of positions. float64, so thousands of positions per image lose no precision."""
    moments: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    for start in range(0, n, batch_size):
        feats = store.get(torch.arange(start, min(start + batch_size, n)))
        for i, f in enumerate(feats):
            rows = f.detach().cpu().double().permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            second = rows.T @ rows if full_covariance else rows.pow(2).sum(dim=0)
            if i == len(moments):
                moments.append((rows.sum(dim=0), second, rows.shape[0]))
            else:
                total, seconds, count = moments[i]
                moments[i] = (total + rows.sum(dim=0), seconds + second, count + rows.shape[0])
    return moments


def whitening_statistics(
    store: FeatureStore, n: int, batch_size: int, device: torch.device, shrinkage: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-scale mean ``(1, C, 1, 1)`` and ZCA whitening ``(C, C, 1, 1)`` of the training features.

    ``W = (S + shrinkage * mean(diag S) * I) ** -1/2`` for the covariance ``S`` over every position of
    every training image.
    """
    out = []
    for total, outer, count in _feature_moments(store, n, batch_size, full_covariance=True):
        mean = total / count
        cov = outer / count - torch.outer(mean, mean)
        cov = (cov + cov.T) / 2
        ridge = shrinkage * cov.diagonal().mean().clamp_min(1e-12)
        values, vectors = torch.linalg.eigh(cov + ridge * torch.eye(len(cov), dtype=cov.dtype))
        transform = (vectors * values.clamp_min(ridge).rsqrt()) @ vectors.T
        channels = len(mean)
        out.append(
            (
                mean.float().view(1, channels, 1, 1).to(device),
                transform.float().view(channels, channels, 1, 1).contiguous().to(device),
            )
        )
    return out


def channel_statistics(
    store: FeatureStore, n: int, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-scale, per-channel mean and std of the training features, shaped ``(1, C, 1, 1)``."""
    out = []
    for total, squares, count in _feature_moments(store, n, batch_size, full_covariance=False):
        mean = total / count
        std = (squares / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-3)  # dead channels: no blow-up
        out.append((mean.float().view(1, -1, 1, 1).to(device), std.float().view(1, -1, 1, 1).to(device)))
    return out
