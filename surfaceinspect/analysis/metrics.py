"""Evaluation metrics: image-level AUROC / AP / F1, pixel-level AUROC and AUPRO.

Conventions shared by every function here:

* ``labels`` / masks: ``1``/``True`` = defective (positive class), ``0``/``False`` = good.
* ``scores`` / maps: higher = more anomalous; "predict defect" means ``score >= threshold``.
* When only one class is present (all good or all defective images, or no defect / no normal
  pixels) the metric is undefined and the function returns ``float('nan')`` instead of raising,
  so a benchmark over a partial test set still produces a report.
* Non-finite scores are a bug upstream (a diverged model); they raise ``ValueError``.

Pixel metrics pool every pixel of every image (images may have different sizes). A defective
image whose mask is empty simply contributes normal pixels (it has no defect regions), in
:func:`pixel_auroc` and :func:`aupro` alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# scikit-learn and SciPy are imported by the functions that use them: a scoring install without them
# (surfaceinspect-runtime) still calibrates with best_f1.

__all__ = [
    "aupro",
    "average_precision",
    "best_f1",
    "f1_at_threshold",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "roc_curve",
]

# 8-connectivity for ground-truth regions, as in the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _image_inputs(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return y, s


def _one_class(y: np.ndarray) -> bool:
    return y.size == 0 or bool(y.all()) or not bool(y.any())


def image_auroc(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Area under the ROC curve of image scores (ties count one half); nan with one class."""
    from sklearn import metrics as skm

    y, s = _image_inputs(labels, scores)
    if _one_class(y):
        return float("nan")
    return float(skm.roc_auc_score(y, s))


def average_precision(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Average precision (step-wise area under precision-recall, scikit-learn definition); nan with one class."""
    from sklearn import metrics as skm

    y, s = _image_inputs(labels, scores)
    if _one_class(y):
        return float("nan")
    return float(skm.average_precision_score(y, s))


def f1_at_threshold(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray, threshold: float) -> float:
    """F1 of the defect class when predicting defect for ``score >= threshold``; nan with one class."""
    y, s = _image_inputs(labels, scores)
    if _one_class(y):
        return float("nan")
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    # tp + fp + fn > 0 always holds here because at least one positive exists.
    return 2.0 * tp / (2.0 * tp + fp + fn)


def best_f1(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> tuple[float, float]:
    """Highest F1 over all thresholds and the threshold reaching it: ``(f1, threshold)``.

    The threshold is one of the observed scores (predict defect for ``score >= threshold``);
    among equal F1 values the highest threshold wins. ``(nan, nan)`` with one class. In numpy
    (sorted scores, counts by binary search), not scikit-learn, because ``recalibrate
    --calibration-mode f1`` runs on line PCs whose scoring install has no scikit-learn; it equals
    the F1 of ``sklearn.metrics.precision_recall_curve`` (``tests/test_metrics.py``).
    """
    y, s = _image_inputs(labels, scores)
    if _one_class(y):
        return float("nan"), float("nan")
    thresholds = np.unique(s)  # ascending, as precision_recall_curve's
    positives, negatives = np.sort(s[y]), np.sort(s[~y])
    tp = (positives.size - np.searchsorted(positives, thresholds, side="left")).astype(np.float64)
    fp = (negatives.size - np.searchsorted(negatives, thresholds, side="left")).astype(np.float64)
    precision, recall = tp / (tp + fp), tp / positives.size
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = float(f1.max())
    # thresholds are ascending: take the largest one with the best F1 (fewest false alarms).
    idx = int(np.flatnonzero(f1 == best)[-1])
    return best, float(thresholds[idx])


def roc_curve(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve points ``(fpr, tpr)``, both ascending from 0 to 1.

    With one class the curve is undefined and two empty arrays are returned (no raise).
    """
    from sklearn import metrics as skm

    y, s = _image_inputs(labels, scores)
    if _one_class(y):
        return np.zeros(0), np.zeros(0)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=True)
    return fpr, tpr


# ----------------------------------------------------------------------------------------- pixel level


def _pixel_inputs(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} anomaly maps")
    pairs = []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        m = np.asarray(mask).astype(bool)
        a = np.asarray(amap, dtype=np.float32)
        if m.shape != a.shape or m.ndim != 2:
            raise ValueError(f"image {i}: mask shape {m.shape} does not match anomaly map shape {a.shape} (need HxW)")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"image {i}: anomaly map contains NaN or infinite values")
        pairs.append((m, a))
    return pairs


def _sample_values(pairs: list[tuple[np.ndarray, np.ndarray]], max_values: int) -> np.ndarray:
    """Deterministic subsample (regular stride) of all pooled map values, at most ``max_values``."""
    total = sum(a.size for _, a in pairs)
    stride = max(1, -(-total // max_values))
    # Stride over the concatenated pixel sequence without materialising it.
    out, offset = [], 0
    for _, a in pairs:
        flat = a.ravel()
        start = (-offset) % stride
        out.append(flat[start::stride])
        offset += flat.size
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _thresholds(pairs: list[tuple[np.ndarray, np.ndarray]], num_thresholds: int | None) -> np.ndarray:
    """Ascending candidate thresholds: every distinct value, or ``num_thresholds`` quantiles if there are more.

    Quantiles come from a deterministic strided subsample (at most a few million values) and are
    actual map values ("nearest" method), so each threshold is an exact operating point.
    """
    if num_thresholds is None:
        return np.unique(np.concatenate([a.ravel() for _, a in pairs]))
    total = sum(a.size for _, a in pairs)
    max_values = max(4_000_000, 20 * num_thresholds)
    sample = _sample_values(pairs, max_values=max_values)
    uniq = np.unique(sample)
    if total <= max_values and uniq.size <= num_thresholds:
        return uniq  # the sample is every pixel: exact
    return np.unique(np.quantile(sample, np.linspace(0.0, 1.0, num_thresholds), method="nearest"))


def _count_at_or_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t_k, the number of ``values`` >= t_k.

    Sorting the values and searching the (few) thresholds in them is an order of magnitude
    faster than searching every value among the thresholds (cache-friendly, O(n log n) with a
    tiny constant), and needs no memory beyond one sorted copy of one image's pixels.
    """
    ordered = np.sort(values, axis=None)
    return ordered.size - np.searchsorted(ordered, thresholds, side="left")


def pixel_auroc(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], max_exact_pixels: int = 2_000_000, num_bins: int = 65_536
) -> float:
    """Pixel-level AUROC with all pixels of all images pooled.

    Up to ``max_exact_pixels`` pooled pixels the result is exact (scikit-learn). Above that,
    to stay memory-sane (600 images of 600x600 are 216 M pixels), scores are binned into
    ``num_bins`` bins whose edges are quantiles of a deterministic, regularly strided subsample
    of all pixels; every pixel is then counted, and only positive/negative pairs that fall in
    the same bin are treated as ties (the error is bounded by the fraction of such pairs, well
    under 1e-3 in practice). Empty masks contribute normal pixels only. nan if there are no
    defect pixels or no normal pixels.
    """
    from sklearn import metrics as skm

    pairs = _pixel_inputs(masks, maps)
    n_pos = sum(int(m.sum()) for m, _ in pairs)
    n_all = sum(m.size for m, _ in pairs)
    if n_pos == 0 or n_pos == n_all:
        return float("nan")
    if n_all <= max_exact_pixels:
        y = np.concatenate([m.ravel() for m, _ in pairs])
        s = np.concatenate([a.ravel() for _, a in pairs])
        return float(skm.roc_auc_score(y, s))
    edges = _thresholds(pairs, num_bins)
    # Bin k holds scores in [edges[k], edges[k+1]); scores below edges[0] join bin 0.
    pos_ge = np.zeros(edges.size)
    neg_ge = np.zeros(edges.size)
    for m, a in pairs:
        pos_ge += _count_at_or_above(a[m], edges)
        neg_ge += _count_at_or_above(a[~m], edges)
    pos_ge[0], neg_ge[0] = n_pos, n_all - n_pos
    pos = pos_ge - np.append(pos_ge[1:], 0.0)
    neg = neg_ge - np.append(neg_ge[1:], 0.0)
    # Mann-Whitney U over bins (descending score): a positive beats every negative in lower bins,
    # ties within a bin count one half.
    neg_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (n_pos * (n_all - n_pos)))


def pro_curve(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], num_thresholds: int | None = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve ``(fpr, pro)``, sorted by ascending FPR, from (0, 0) to (1, 1).

    For each threshold t: FPR = fraction of normal pixels (mask False, pooled over all images,
    including the background of defective images and all pixels of empty masks) with map >= t;
    PRO = mean over every ground-truth region (8-connected component of a mask, per image) of the
    fraction of that region's pixels with map >= t. Thresholds are every distinct map value if
    ``num_thresholds`` is None (exact curve) or when there are at most that many; otherwise
    ``num_thresholds`` quantiles of the pooled map values. Returns empty arrays when there are no
    regions or no normal pixels.
    """
    from scipy import ndimage

    pairs = _pixel_inputs(masks, maps)
    labelled = [ndimage.label(m, structure=_EIGHT_CONNECTED) for m, _ in pairs]
    n_regions = sum(n for _, n in labelled)
    n_normal = sum(int((~m).sum()) for m, _ in pairs)
    if n_regions == 0 or n_normal == 0:
        return np.zeros(0), np.zeros(0)
    thresholds = _thresholds(pairs, num_thresholds)
    fp = np.zeros(thresholds.size)
    overlap = np.zeros(thresholds.size)
    for (m, a), (lab, _) in zip(pairs, labelled, strict=True):
        fp += _count_at_or_above(a[~m], thresholds)
        for r, box in enumerate(ndimage.find_objects(lab), start=1):
            region = a[box][lab[box] == r]
            overlap += _count_at_or_above(region, thresholds) / region.size
    # Threshold +inf gives (0, 0) and -inf gives (1, 1); the latter matters when quantile
    # thresholds do not reach the smallest pixel value.
    fpr = np.concatenate([[0.0], (fp / n_normal)[::-1], [1.0]])
    pro = np.concatenate([[0.0], (overlap / n_regions)[::-1], [1.0]])
    return fpr, pro


def aupro(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float = 0.3, num_thresholds: int | None = 2000
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (Bergmann et al., MVTec AD, CVPR 2019).

    The PRO curve (see :func:`pro_curve`) is integrated with the trapezoidal rule over
    FPR in [0, fpr_limit]; the PRO value at exactly ``fpr_limit`` is linearly interpolated
    between the neighbouring curve points, and the area is divided by ``fpr_limit`` so a perfect
    detector scores 1.0. Defective images with an empty mask add no regions and their pixels
    count as normal pixels for the FPR (consistent with :func:`pixel_auroc`).
    Returns nan when there are no ground-truth regions at all (or no normal pixels).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps, num_thresholds=num_thresholds)
    if fpr.size == 0:
        return float("nan")
    # Several thresholds can share one FPR with growing PRO: the trapezoid treats that as a vertical
    # step, and the interpolation at the cut-off starts from the last (highest-PRO) such point.
    inside = fpr <= fpr_limit
    x = fpr[inside]
    y = pro[inside]
    if x[-1] < fpr_limit:
        nxt = int(np.argmax(~inside))  # first point beyond the limit (there is one: the curve ends at FPR 1)
        x0, y0, x1, y1 = fpr[nxt - 1], pro[nxt - 1], fpr[nxt], pro[nxt]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_lim)
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / fpr_limit
