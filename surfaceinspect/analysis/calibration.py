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

Binding: a calibration names the model it was made for (``method`` and the SHA-256 of its weights,
``weights_sha256``); a model refuses a calibration of another one, whose thresholds are in another
model's units. Its thresholds must be finite and within the range of the calibration scores they
were chosen from (widened by that range on each side): a hand-edited ``image_threshold: 1e9`` is
refused, not obeyed. The good calibration scores themselves are kept (``good_scores``): they are
the reference of drift monitoring (:mod:`surfaceinspect.analysis.drift`).

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
from statistics import NormalDist
from typing import Any

import numpy as np

from surfaceinspect.errors import ConfigError, ModelDirError
from surfaceinspect.storage.atomic import write_json_atomic

CALIBRATION_VERSION = 3  # 3: weights_sha256, good_scores and the score ranges (v1 and v2 files still load)
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


# How a threshold for a false-reject target is set from good scores (see threshold_for).
ESTIMATORS = ("auto", "conformal", "lognormal", "normal")
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


MIN_FITTED = 20  # fewer good scores than this are too few to fit a tail to (``auto`` keeps conformal)
# From this many good scores on, ``auto`` is conformal: the images the default 1 % target needs for its
# guarantee. A count, not a function of the target, so that a looser target never gives a stricter
# threshold (switching estimators between targets would: on MTD, 2 % conformal sat above 1 % fitted).
CONFORMAL_FROM = 99


def resolve_estimator(estimator: str, n_good: int, false_reject_rate: float) -> str:
    """``auto``: ``conformal`` from :data:`CONFORMAL_FROM` good scores on (enough for the default
    target's guarantee), else ``lognormal`` — a fitted tail, not the highest of a few dozen scores,
    which one odd image decides and which sits far above the target's quantile — from
    :data:`MIN_FITTED` scores on (below, a median and MAD are too unsteady: conformal again).
    ``false_reject_rate`` is accepted for explicit estimators' sake and does not change ``auto``."""
    if estimator != "auto":
        return estimator
    return "lognormal" if MIN_FITTED <= n_good < CONFORMAL_FROM else "conformal"


def threshold_for(good_scores: np.ndarray, false_reject_rate: float, estimator: str) -> float:
    """The image threshold for ``false_reject_rate`` from good scores, by ``estimator``.

    ``auto``: see :func:`resolve_estimator`.
    ``conformal``: the split-conformal order statistic (the highest score below 1/rate - 1 images).
    ``lognormal`` / ``normal``: the (1 - rate) quantile of a normal fitted to the log-scores / the
    scores with median and MAD, so that one odd image moves it little (positive scores only for
    ``lognormal``; otherwise it falls back to ``normal``).
    """
    scores = np.asarray(good_scores, dtype=np.float64)
    estimator = resolve_estimator(estimator, scores.size, false_reject_rate)
    if estimator == "conformal":
        return conformal_threshold(scores, false_reject_rate)[0]
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown threshold estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    log = estimator == "lognormal" and bool(np.all(scores > 0))
    x = np.log(scores) if log else scores
    centre = float(np.median(x))
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(x - centre)))
    if spread <= 0:  # most scores equal: no spread to extrapolate from
        return conformal_threshold(scores, false_reject_rate)[0]
    z = float(NormalDist().inv_cdf(1.0 - false_reject_rate))
    value = centre + z * spread
    return float(np.exp(value)) if log else value


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
    weights_sha256: str | None = None  # the weights this calibration was made for (None: an older file)
    good_scores: list[float] = field(default_factory=list)  # the good calibration scores, ascending
    defect_score_stats: dict[str, float] | None = None  # labelled modes: min, median, max of the defect scores
    good_map_max_stats: dict[str, float] | None = None  # min, median, max of the good images' map maxima

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
            if data.get("version") == 2:  # version 3 only added fields
                data["version"] = CALIBRATION_VERSION
            calibration = cls(**data)
        except (ValueError, TypeError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep, wrong fields
            raise ModelDirError(
                f"{path} is not a valid calibration file ({exc}); run `surfaceinspect recalibrate`"
            ) from None
        if calibration.version != CALIBRATION_VERSION:
            raise ModelDirError(
                f"{path} has calibration version {calibration.version}; run `surfaceinspect recalibrate`"
            )
        _check_thresholds(path, calibration)
        return calibration

    def check_model(self, path: Path, method: str, weights_sha256: str | None) -> list[str]:
        """Refuse a calibration made for another model; returns notes (an older file names no weights).

        ``path`` is the calibration file, ``method`` and ``weights_sha256`` those of the model
        loading it. A calibration of another model would judge every image with thresholds in
        that model's units (a DRAEM calibration turned every CS-Flow score into a defect).
        """
        fix = (
            f"restore the model's own {path.name}, or recalibrate: "
            f"surfaceinspect recalibrate --model {path.parent} GOOD_DIR"
        )
        if self.method != method:
            raise ModelDirError(
                f"{path} was made for a {self.method} model, but {path.parent} holds a {method} model; {fix}"
            )
        if self.weights_sha256 is None:
            return [
                f"{path} does not name the weights it was made for (written by an older surfaceinspect); "
                f"`surfaceinspect recalibrate --model {path.parent} GOOD_DIR` binds it"
            ]
        if weights_sha256 is not None and self.weights_sha256 != weights_sha256:
            raise ModelDirError(
                f"{path} was made for another {method} model (weights {self.weights_sha256[:12]}, this model's are "
                f"{weights_sha256[:12]}): its thresholds do not fit this model's scores; {fix}"
            )
        return []


def _number(path: Path, name: str, value: Any) -> float:
    """A finite JSON number (not text, not a boolean), or a ModelDirError naming the field."""
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not math.isfinite(number):
        raise ModelDirError(f"{path}: {name} is {value!r}, not a finite number; run `surfaceinspect recalibrate`")
    return number


def _check_range(path: Path, name: str, value: float, low: Any, high: Any | None) -> None:
    """``value`` within the scores it was chosen from (``low`` .. ``high``), widened by their range on each side.

    ``high`` None: only the lower end is known (the upper one is not checked).
    """
    low = _number(path, f"the lowest calibration score for {name}", low)
    top = low if high is None else _number(path, f"the highest calibration score for {name}", high)
    margin = max(top - low, 1e-6 * max(1.0, abs(top)))
    if value < low - margin or (high is not None and value > top + margin):
        upper = f"{top + margin:.6g}" if high is not None else "..."
        raise ModelDirError(
            f"{path}: {name} {value:.6g} is outside the plausible range {low - margin:.6g} .. {upper} of its "
            "calibration scores (was the file edited?); run `surfaceinspect recalibrate`"
        )


def _check_thresholds(path: Path, calibration: Calibration) -> None:
    """Finite thresholds and scales, within the plausible range of the scores they were chosen from.

    Every mode picks its image threshold among the calibration scores (good ones in quantile mode,
    good or defective ones in f1/recall mode) and the pixel threshold among the good map maxima, so
    a threshold far outside them was not made by calibration (``image_threshold: 1e9`` would pass
    every defect). Files of older versions, which lack some ranges, are checked as far as they allow.
    """
    image_t = _number(path, "image_threshold", calibration.image_threshold)
    pixel_t = _number(path, "pixel_threshold", calibration.pixel_threshold)
    for name in ("image_scale", "pixel_scale"):
        if _number(path, name, getattr(calibration, name)) <= 0:
            raise ModelDirError(f"{path}: {name} must be positive (invalid thresholds); run surfaceinspect recalibrate")
    good = calibration.good_score_stats or {}
    defect = calibration.defect_score_stats or {}
    if "min" in good:
        low = min(good["min"], defect.get("min", good["min"]))
        if defect:
            high = max(good.get("max", defect["max"]), defect["max"])
        else:  # an older labelled calibration: its defect scores (above the good ones) are unknown
            high = None if calibration.n_defective else good.get("max")
        _check_range(path, "image_threshold", image_t, low, high)
    maxima = calibration.good_map_max_stats or {}
    if "min" in maxima:
        _check_range(path, "pixel_threshold", pixel_t, maxima["min"], maxima.get("max"))


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    out = {_V1_RENAMED.get(k, k): v for k, v in data.items()}
    if out.get("mode") != "quantile":  # v1 stored the target here, which no labelled mode guarantees
        out["guaranteed_false_reject_rate"] = None
    out["version"] = CALIBRATION_VERSION
    return out


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}


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
    weights_sha256: str | None = None,
    estimator: str = "conformal",
) -> Calibration:
    """Build a Calibration from scores of good (and, for f1/recall, defective) images.

    ``weights_sha256`` binds it to the model whose scores these are (see :meth:`Calibration.check_model`).
    ``estimator``: how quantile mode sets the image threshold from the good scores (:func:`threshold_for`).
    """
    good_scores = np.asarray(good_scores, dtype=np.float64)
    if good_scores.size == 0:
        raise ConfigError("calibration needs at least one readable good image")
    if not np.all(np.isfinite(good_scores)):
        raise ConfigError("calibration scores are not finite; the model is broken, retrain it")
    defect_scores = np.asarray(defect_scores if defect_scores is not None else [], dtype=np.float64)
    notes: list[str] = []
    image_thr_q, achievable = conformal_threshold(good_scores, false_reject_rate)
    chosen = resolve_estimator(estimator, good_scores.size, false_reject_rate)
    fitted = mode == "quantile" and chosen != "conformal"
    if fitted:  # a fitted tail: an estimate of the target's quantile, no guarantee
        image_thr_q, achievable = threshold_for(good_scores, false_reject_rate, chosen), None
        # Never beyond what the calibration's own range check accepts: past the highest good score by
        # more than the scores' range is extrapolation no fit on a few dozen images supports.
        top, low = float(good_scores.max()), float(good_scores.min())
        image_thr_q = min(image_thr_q, top + 0.99 * max(top - low, 1e-6 * max(1.0, abs(top))))
        if estimator == "auto":
            notes.append(
                f"{good_scores.size} good images are too few for a guaranteed false-reject rate (from "
                f"{CONFORMAL_FROM} on); the threshold is the {1 - false_reject_rate:g} quantile of a log-normal "
                "fitted to their scores: an estimate, not a guarantee. Calibrate on more good images to get one"
            )
    elif achievable > false_reject_rate:
        notes.append(
            f"{good_scores.size} good image{'' if good_scores.size == 1 else 's'} cannot guarantee a false-reject "
            f"rate of {false_reject_rate:g}; "
            f"the threshold is the highest good score (guaranteed rate {achievable:.3g}). "
            f"Use at least {math.ceil(1 / false_reject_rate - 1)} calibration images for the target."
        )
    if mode == "quantile":
        image_threshold = image_thr_q
        target = {"false_reject_rate": float(false_reject_rate), **({"estimator": chosen} if fitted else {})}
    else:
        labels = np.concatenate([np.zeros(good_scores.size, bool), np.ones(defect_scores.size, bool)])
        scores = np.concatenate([good_scores, defect_scores])
        if mode == "f1":
            from surfaceinspect.analysis.metrics import best_f1  # scikit-learn: imported only when needed

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
        guaranteed_false_reject_rate=float(achievable) if mode == "quantile" and achievable is not None else None,
        notes=notes,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        source=source,
        weights_sha256=weights_sha256,
        good_scores=np.sort(good_scores).tolist(),
        defect_score_stats=_stats(defect_scores) if defect_scores.size else None,
        good_map_max_stats=_stats(np.asarray(good_map_maxima, dtype=np.float64)),
    )
