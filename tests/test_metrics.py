"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from surfaceinspect.analysis import metrics

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]  # sorted desc: 0.8 P, 0.4 N, 0.35 P, 0.1 N


def test_image_auroc_hand_computed():
    # Positive 0.35 beats one of two negatives, 0.8 beats both: 3 of 4 pairs.
    assert metrics.image_auroc(LABELS, SCORES) == pytest.approx(0.75)
    # Ties count one half: 0.5 (pos) vs 0.5 (neg) -> (1 + 0.5 + 2) / 4.
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert metrics.image_auroc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(1.0)


def test_average_precision_hand_computed():
    # Recall 0.5 at precision 1 (0.8), recall 1 at precision 2/3 (0.35): 0.5 * 1 + 0.5 * 2/3.
    assert metrics.average_precision(LABELS, SCORES) == pytest.approx(0.5 + 1 / 3)


def test_f1_at_threshold_is_inclusive():
    # >= 0.35 flags 0.4, 0.35, 0.8: TP 2, FP 1, FN 0 -> 4/5.
    assert metrics.f1_at_threshold(LABELS, SCORES, 0.35) == pytest.approx(0.8)
    # >= 0.5 flags only 0.8: TP 1, FP 0, FN 1 -> 2/3.
    assert metrics.f1_at_threshold(LABELS, SCORES, 0.5) == pytest.approx(2 / 3)
    # Nothing flagged: F1 0.
    assert metrics.f1_at_threshold(LABELS, SCORES, 5.0) == 0.0


def test_best_f1_hand_computed():
    # Candidates: 0.8 -> 2/3, 0.4 -> 1/2, 0.35 -> 4/5, 0.1 -> 2/3.
    f1, thr = metrics.best_f1(LABELS, SCORES)
    assert f1 == pytest.approx(0.8)
    assert thr == pytest.approx(0.35)
    assert metrics.f1_at_threshold(LABELS, SCORES, thr) == pytest.approx(f1)


@pytest.mark.parametrize("seed", range(20))
def test_best_f1_equals_scikit_learns_precision_recall_curve(seed):
    """The numpy best_f1 (what recalibrate uses without scikit-learn) against the reference, ties included."""
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = np.round(rng.normal(labels * rng.uniform(0, 2), 1.0), int(rng.integers(0, 3)))  # rounding: ties
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1s = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                    where=precision + recall > 0)[:-1]  # fmt: skip
    expected = (f1s.max(), thresholds[np.flatnonzero(f1s == f1s.max())[-1]])
    assert metrics.best_f1(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_roc_curve_endpoints_and_area():
    fpr, tpr = metrics.roc_curve(LABELS, SCORES)
    assert fpr[0] == 0.0 and tpr[0] == 0.0 and fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_one_class_gives_nan(labels):
    scores = list(range(len(labels)))
    assert math.isnan(metrics.image_auroc(labels, scores))
    assert math.isnan(metrics.average_precision(labels, scores))
    assert math.isnan(metrics.f1_at_threshold(labels, scores, 0.5))
    f1, thr = metrics.best_f1(labels, scores)
    assert math.isnan(f1) and math.isnan(thr)
    fpr, tpr = metrics.roc_curve(labels, scores)
    assert fpr.size == 0 and tpr.size == 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="length"):
        metrics.image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        metrics.pixel_auroc([np.zeros((2, 2), bool)], [np.zeros((2, 3))])


# ------------------------------------------------------------------------------------------- pixels

PIX_MASKS = [np.array([[0, 1, 0]], bool), np.array([[1, 0], [0, 0]], bool)]
PIX_MAPS = [np.array([[0.1, 0.9, 0.3]]), np.array([[0.2, 0.05], [0.25, 0.3]])]


def test_pixel_auroc_pools_images_of_different_sizes():
    # Positives 0.9 (beats all 5 negatives) and 0.2 (beats 0.1 and 0.05): 7 / 10.
    assert metrics.pixel_auroc(PIX_MASKS, PIX_MAPS) == pytest.approx(0.7)
    # The binned (large-data) path is exact when every value gets its own bin.
    assert metrics.pixel_auroc(PIX_MASKS, PIX_MAPS, max_exact_pixels=0) == pytest.approx(0.7)


def test_pixel_auroc_binned_matches_exact_on_larger_data():
    rng = np.random.default_rng(0)
    masks, maps = [], []
    for i in range(30):
        h, w = 40 + i, 50 - i // 2
        m = np.zeros((h, w), bool)
        m[5 : 5 + i % 7, 10 : 10 + i % 9] = True
        a = rng.normal(0, 1, (h, w)) + 1.5 * m
        masks.append(m)
        maps.append(a)
    exact = metrics.pixel_auroc(masks, maps)
    binned = metrics.pixel_auroc(masks, maps, max_exact_pixels=0, num_bins=4096)
    assert 0.8 < exact < 0.9
    assert binned == pytest.approx(exact, abs=1e-3)


def test_pixel_auroc_nan_without_defect_pixels():
    masks = [np.zeros((3, 3), bool), np.zeros((2, 4), bool)]
    maps = [np.random.default_rng(1).random((3, 3)), np.ones((2, 4))]
    assert math.isnan(metrics.pixel_auroc(masks, maps))
    assert math.isnan(metrics.pixel_auroc([np.ones((2, 2), bool)], [np.ones((2, 2))]))


# -------------------------------------------------------------------------------------------- AUPRO

# Image A: regions R1 = {(0,0), (1,1)} (one region only with 8-connectivity) with values 0.9, 0.4;
# R2 = {(0,3), (1,3)} with values 0.8, 0.4. Image B: R3 = {(0,0)} with value 0.0 (never overlapped
# above the lowest threshold). Image C: defective image with an EMPTY mask -> normal pixels only.
AUPRO_MASKS = [
    np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0]], bool),
    np.array([[1, 0], [0, 0]], bool),
    np.array([[0]], bool),
]
AUPRO_MAPS = [
    np.array([[0.9, 0.2, 0.0, 0.8], [0.2, 0.4, 0.0, 0.4], [0.0, 0.0, 0.0, 0.6]]),
    np.array([[0.0, 0.0], [0.0, 0.8]]),
    np.array([[0.9]]),
]
# 12 normal pixels. Threshold -> (#normal >= t, PRO):
#   0.9 -> 1, (1/2 + 0 + 0)/3 = 1/6      0.8 -> 2, (1/2 + 1/2 + 0)/3 = 1/3
#   0.6 -> 3, 1/3                         0.4 -> 3, (1 + 1 + 0)/3 = 2/3
#   0.2 -> 5, 2/3                         0.0 -> 12, 1
# Trapezoids up to FPR 0.3: 1/144 + 1/48 + 1/36 + (vertical step at 3/12) + 2/3 * 0.05 = 64/720.
AUPRO_03 = (64 / 720) / 0.3  # = 8/27
# Up to 0.5: 40/720 + 2/3 * 1/6 + (2/3 + 5/7)/2 * 1/12, PRO(0.5) interpolated = 5/7 -> 113/504.
AUPRO_05 = (113 / 504) / 0.5


def test_pro_curve_hand_computed():
    fpr, pro = metrics.pro_curve(AUPRO_MASKS, AUPRO_MAPS, num_thresholds=None)
    np.testing.assert_allclose(fpr, [0, 1 / 12, 2 / 12, 3 / 12, 3 / 12, 5 / 12, 1, 1])
    np.testing.assert_allclose(pro, [0, 1 / 6, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1])


@pytest.mark.parametrize("num_thresholds", [None, 2000])
def test_aupro_hand_computed(num_thresholds):
    assert metrics.aupro(AUPRO_MASKS, AUPRO_MAPS, num_thresholds=num_thresholds) == pytest.approx(AUPRO_03)
    assert metrics.aupro(AUPRO_MASKS, AUPRO_MAPS, fpr_limit=0.5, num_thresholds=num_thresholds) == pytest.approx(
        AUPRO_05
    )


def test_aupro_perfect_and_cutoff_matters():
    masks = [np.array([[1, 1, 0, 0]], bool), np.array([[0, 0, 0, 1]], bool)]
    perfect = [np.array([[0.9, 0.8, 0.1, 0.2]]), np.array([[0.0, 0.1, 0.2, 0.7]])]
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0)
    # Same ranking but with the normal pixel 0.2 above the 0.1-valued region pixel.
    worse = [np.array([[0.9, 0.1, 0.3, 0.2]]), np.array([[0.0, 0.1, 0.2, 0.7]])]
    assert metrics.aupro(masks, worse) < 1.0
    assert metrics.aupro(AUPRO_MASKS, AUPRO_MAPS, fpr_limit=0.3) != pytest.approx(
        metrics.aupro(AUPRO_MASKS, AUPRO_MAPS, fpr_limit=0.5)
    )


def test_aupro_quantile_thresholds_close_to_exact():
    rng = np.random.default_rng(3)
    masks, maps = [], []
    for i in range(12):
        m = np.zeros((48, 56), bool)
        m[10 : 14 + i, 20 : 23 + i] = True
        masks.append(m)
        maps.append(rng.normal(0, 1, m.shape) + 2.0 * m)
    exact = metrics.aupro(masks, maps, num_thresholds=None)
    approx = metrics.aupro(masks, maps, num_thresholds=300)
    assert 0.3 < exact < 0.95
    assert approx == pytest.approx(exact, abs=0.01)


def test_aupro_nan_without_regions():
    masks = [np.zeros((4, 4), bool), np.zeros((3, 5), bool)]
    maps = [np.random.default_rng(2).random((4, 4)), np.zeros((3, 5))]
    assert math.isnan(metrics.aupro(masks, maps))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(AUPRO_MASKS, AUPRO_MAPS, fpr_limit=0.0)


@pytest.mark.realdata
def test_pixel_metrics_on_real_mtd_masks(real_dataset):
    """Magnetic Tile Defects masks: varying image sizes and 4 defective images with empty masks."""
    from surfaceinspect.data.datasets import load_mvtec
    from surfaceinspect.data.imageio import image_size, read_mask

    ds = load_mvtec(real_dataset("mtd"))
    masks = [read_mask(s.mask_path) if s.mask_path else np.zeros(image_size(s.path), bool) for s in ds.test]
    assert len({m.shape for m in masks}) > 10
    assert sum(s.is_anomalous and not m.any() for s, m in zip(ds.test, masks, strict=True)) == 4
    perfect = [m.astype(np.float32) for m in masks]
    assert metrics.pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0)
    # A noisy map on every 12th image (keeps the test fast): binned pixel AUROC within 1e-3 of exact.
    rng = np.random.default_rng(0)
    sub = masks[::12]
    noisy = [m * 0.6 + rng.normal(0, 0.3, m.shape).astype(np.float32) for m in sub]
    exact = metrics.pixel_auroc(sub, noisy, max_exact_pixels=10**9)
    assert 0.85 < exact < 0.99
    assert metrics.pixel_auroc(sub, noisy, max_exact_pixels=0) == pytest.approx(exact, abs=1e-3)
    assert 0.5 < metrics.aupro(sub, noisy) < 0.95
