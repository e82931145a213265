"""Decision thresholds and the normalised score, calibrated on held-out images.

Image threshold, ``quantile`` mode (only good images needed): the split-conformal quantile of the
good calibration scores. With n good scores sorted ascending, the threshold is the k-th smallest
with ``k = ceil((n + 1) * (1 - false_reject_rate))``. For a new good image exchangeable with the
calibration images this guarantees ``P(false reject) <= false_reject_rate`` — a finite-sample
bound, not an asymptotic one, which matters for the 10–50 images a calibration split usually
has. When n is too small for the target (``k > n``), the threshold is the largest good score
and the guaranteed rate is only ``1 / (n + 1)``; the calibration file says so
(``guaranteed_false_reject_rate``) and the CLI warns.

Labelled modes (a folder with ``good/`` and defect subfolders): ``f1`` picks the threshold that
maximises F1; ``recall`` picks the highest threshold whose recall on the defective images is at
least ``target_recall``.

Pixel threshold: the same conformal quantile of the per-image *maximum* of the good images'
anomaly maps, so that a good image shows no defect region at the target rate.

Normalised score: ``1 / (1 + exp(-(s - t) / w))`` with ``t`` the threshold and ``w`` chosen so
the median good score maps to 0.1. The threshold always sits at 0.5; maps are normalised the same
way with the pixel threshold and the median good pixel value, so colours mean the same on every
image (never a per-image min–max).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surfaceinspect.atomic import write_json_atomic
from surfaceinspect.errors import ConfigError, ModelDirError

CALIBRATION_VERSION = 2
# Fields renamed since version 1 (v1 files still load).
_V1_RENAMED = {"pixel_center": "pixel_median_good", "achievable_false_reject_rate": "guaranteed_false_reject_rate"}
_MEDIAN_GOOD_NORMALIZED = 0.1  # where the median good image lands on the normalised scale


def conformal_threshold(good_scores: np.ndarray, false_reject_rate: float) -> tuple[float, float]:
    """Threshold at the split-conformal quantile; returns ``(threshold, guaranteed_rate)``."""
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))
    n = scores.size
    if n == 0:
        raise ConfigError("calibration needs at least one good image score")
    k = math.ceil((n + 1) * (1.0 - false_reject_rate))
    if k > n:
        return float(scores[-1]), 1.0 / (n + 1)
    return float(scores[k - 1]), float(false_reject_rate)


def recall_threshold(labels: np.ndarray, scores: np.ndarray, target_recall: float) -> tuple[float, float]:
    """The highest threshold whose recall on defective images is >= target; ``(thr, recall)``."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    _require_both_classes(labels)
    defect_scores = np.sort(scores[labels])[::-1]  # descending
    n_needed = math.ceil(target_recall * defect_scores.size)
    thr = float(defect_scores[max(n_needed, 1) - 1])
    return thr, float(np.mean(defect_scores >= thr))


def _require_both_classes(labels: np.ndarray) -> None:
    if labels.all() or not labels.any():
        raise ConfigError(
            "this calibration mode needs both good and defective images; give a folder with good/ and defect "
            "subfolders, or use mode quantile"
        )


def _spread(threshold: float, median: float) -> float:
    gap = threshold - median
    if gap <= 1e-12:  # degenerate calibration (all good scores equal): keep the mapping finite and steep
        gap = max(abs(threshold) * 1e-3, 1e-9)
    return gap / math.log(1.0 / _MEDIAN_GOOD_NORMALIZED - 1.0)


@dataclass
class Calibration:
    """Thresholds, how they were chosen, and the normalisation to a score in [0, 1]."""

    method: str
    image_threshold: float
    pixel_threshold: float
    image_scale: float  # w of the image-score logistic
    pixel_median_good: float  # median anomaly-map value of the good calibration images
    pixel_scale: float
    mode: str
    target: dict[str, float]
    n_good: int
    n_defective: int
    good_score_stats: dict[str, float]
    # quantile mode: the false-reject rate the threshold guarantees (the target, or 1/(n+1) with too
    # few images); None in f1/recall modes, which guarantee no rate.
    guaranteed_false_reject_rate: float | None
    notes: list[str] = field(default_factory=list)
    created: str = ""
    source: str = ""
    version: int = CALIBRATION_VERSION

    def normalize(self, scores: np.ndarray | float) -> np.ndarray | float:
        """Map raw image scores to [0, 1] with the threshold at exactly 0.5."""
        return _logistic((np.asarray(scores, dtype=np.float64) - self.image_threshold) / self.image_scale)

    def normalize_map(self, anomaly_map: np.ndarray) -> np.ndarray:
        """Map raw anomaly-map values to [0, 1] with the pixel threshold at exactly 0.5 (float32)."""
        z = (np.asarray(anomaly_map, dtype=np.float32) - np.float32(self.pixel_threshold)) / np.float32(
            self.pixel_scale
        )
        return _logistic(z).astype(np.float32)

    def is_defect(self, score: float) -> bool:
        return bool(score >= self.image_threshold)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["normalization"] = {
            "formula": "1 / (1 + exp(-(score - image_threshold) / image_scale)); threshold -> 0.5, "
            f"median good score -> {_MEDIAN_GOOD_NORMALIZED}",
        }
        return out

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Calibration:
        if not path.is_file():
            raise ModelDirError(
                f"{path} is missing; recreate it with `surfaceinspect recalibrate --model {path.parent} GOOD_DIR`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            data.pop("normalization", None)
            if data.get("version") == 1:
                data = _upgrade_v1(data)
            calibration = cls(**data)
        except (ValueError, TypeError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep, wrong fields
            raise ModelDirError(
                f"{path} is not a valid calibration file ({exc}); run `surfaceinspect recalibrate`"
            ) from None
        if calibration.version != CALIBRATION_VERSION:
            raise ModelDirError(
                f"{path} has calibration version {calibration.version}; run `surfaceinspect recalibrate`"
            )
        values = (
            calibration.image_threshold,
            calibration.image_scale,
            calibration.pixel_threshold,
            calibration.pixel_scale,
        )
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ModelDirError(
                f"{path} holds a threshold or scale that is not a number; run `surfaceinspect recalibrate`"
            )
        if not all(math.isfinite(v) for v in values) or calibration.image_scale <= 0 or calibration.pixel_scale <= 0:
            raise ModelDirError(f"{path} holds non-finite or invalid thresholds; run `surfaceinspect recalibrate`")
        return calibration


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    out = {_V1_RENAMED.get(k, k): v for k, v in data.items()}
    if out.get("mode") != "quantile":  # v1 stored the target here, which no labelled mode guarantees
        out["guaranteed_false_reject_rate"] = None
    out["version"] = CALIBRATION_VERSION
    return out


def _logistic(z: np.ndarray) -> np.ndarray | float:
    out = 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1/(1+exp(-z)) without overflow warnings
    return float(out) if np.ndim(out) == 0 else out


def calibrate(
    method: str,
    good_scores: np.ndarray,
    good_map_maxima: np.ndarray,
    good_map_medians: np.ndarray,
    *,
    false_reject_rate: float,
    mode: str = "quantile",
    target_recall: float = 0.95,
    defect_scores: np.ndarray | None = None,
    source: str = "",
) -> Calibration:
    """Build a Calibration from scores of good (and, for f1/recall, defective) images."""
    good_scores = np.asarray(good_scores, dtype=np.float64)
    if good_scores.size == 0:
        raise ConfigError("calibration needs at least one readable good image")
    if not np.all(np.isfinite(good_scores)):
        raise ConfigError("calibration scores are not finite; the model is broken, retrain it")
    defect_scores = np.asarray(defect_scores if defect_scores is not None else [], dtype=np.float64)
    notes: list[str] = []
    image_thr_q, achievable = conformal_threshold(good_scores, false_reject_rate)
    if achievable > false_reject_rate:
        notes.append(
            f"{good_scores.size} good image{'' if good_scores.size == 1 else 's'} cannot guarantee a false-reject "
            f"rate of {false_reject_rate:g}; "
            f"the threshold is the highest good score (guaranteed rate {achievable:.3g}). "
            f"Use at least {math.ceil(1 / false_reject_rate - 1)} calibration images for the target."
        )
    if mode == "quantile":
        image_threshold = image_thr_q
        target = {"false_reject_rate": float(false_reject_rate)}
    else:
        labels = np.concatenate([np.zeros(good_scores.size, bool), np.ones(defect_scores.size, bool)])
        scores = np.concatenate([good_scores, defect_scores])
        if mode == "f1":
            from surfaceinspect.metrics import best_f1  # scikit-learn: imported only when needed

            _require_both_classes(labels)
            f1, image_threshold = best_f1(labels, scores)
            target = {"f1": f1}
        elif mode == "recall":
            image_threshold, recall = recall_threshold(labels, scores, target_recall)
            target = {"target_recall": float(target_recall), "recall": recall}
        else:
            raise ConfigError(f"unknown calibration mode {mode!r}; use quantile, f1 or recall")
        target["false_reject_rate_on_calibration"] = float(np.mean(good_scores >= image_threshold))
    pixel_threshold, _ = conformal_threshold(np.asarray(good_map_maxima), false_reject_rate)
    pixel_median_good = float(np.median(good_map_medians))
    median_good = float(np.median(good_scores))
    return Calibration(
        method=method,
        image_threshold=float(image_threshold),
        pixel_threshold=float(pixel_threshold),
        image_scale=_spread(float(image_threshold), median_good),
        pixel_median_good=pixel_median_good,
        pixel_scale=_spread(float(pixel_threshold), pixel_median_good),
        mode=mode,
        target=target,
        n_good=int(good_scores.size),
        n_defective=int(defect_scores.size),
        good_score_stats={
            "min": float(good_scores.min()),
            "median": median_good,
            "mean": float(good_scores.mean()),
            "std": float(good_scores.std()),
            "p95": float(np.quantile(good_scores, 0.95)),
            "max": float(good_scores.max()),
        },
        guaranteed_false_reject_rate=float(achievable) if mode == "quantile" else None,
        notes=notes,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        source=source,
    )
