"""Threshold calibration: target false-reject rate, normalised score, F1 and recall modes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from surfaceinspect.analysis.calibration import (
    Calibration,
    calibrate,
    conformal_threshold,
    recall_threshold,
    threshold_for,
)
from surfaceinspect.errors import ConfigError, ModelDirError


def test_conformal_threshold_hits_target_false_reject_rate():
    rng = np.random.default_rng(0)
    target = 0.05
    rates = []
    for _ in range(300):
        cal = rng.gamma(2.0, 1.0, size=60)
        thr, guaranteed = conformal_threshold(cal, target)
        assert guaranteed == target
        fresh = rng.gamma(2.0, 1.0, size=2000)
        rates.append(np.mean(fresh > thr))
    # Conformal guarantee: expected FRR <= target, and it is tight (>= target - 1/(n+1)).
    assert target - 1 / 61 - 0.005 <= np.mean(rates) <= target + 0.005


def test_too_few_images_falls_back_to_max_and_says_so():
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    thr, guaranteed = conformal_threshold(scores, 0.01)
    assert thr == 0.4 and guaranteed == pytest.approx(1 / 5)
    cal = calibrate("toy", scores, scores, scores, false_reject_rate=0.01)
    assert cal.guaranteed_false_reject_rate == pytest.approx(0.2)
    assert cal.notes and "cannot guarantee" in cal.notes[0]


def test_normalised_score_puts_threshold_at_half_and_median_good_at_tenth():
    rng = np.random.default_rng(1)
    good = rng.normal(1.0, 0.1, 200)
    cal = calibrate("toy", good, good + 0.5, good, false_reject_rate=0.02)
    assert cal.normalize(cal.image_threshold) == pytest.approx(0.5)
    assert cal.normalize(float(np.median(good))) == pytest.approx(0.1)
    assert cal.normalize(cal.image_threshold + 10) > 0.99
    assert 0.0 <= cal.normalize(-1e9) < 1e-6
    maps = cal.normalize_map(np.array([[cal.pixel_threshold, cal.pixel_threshold + 5]], np.float32))
    assert maps.dtype == np.float32 and maps[0, 0] == pytest.approx(0.5) and maps[0, 1] > 0.9


def test_f1_mode_picks_the_separating_threshold():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.8, 0.9])
    # thresholds: 0.5 -> tp3 fp1 fn0 f1=6/7; 0.8 -> tp2 fp0 fn1 f1=0.8; 0.6 -> tp2 fp1 fn1 f1=2/3
    good, defect = scores[labels == 0], scores[labels == 1]
    cal = calibrate("toy", good, good, good, false_reject_rate=0.05, mode="f1", defect_scores=defect)
    thr, f1 = cal.image_threshold, cal.target["f1"]
    assert thr == 0.5 and f1 == pytest.approx(6 / 7)
    assert cal.guaranteed_false_reject_rate is None  # a labelled mode guarantees no false-reject rate


def test_recall_mode_picks_highest_threshold_meeting_target():
    labels = np.array([0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.5, 0.3, 0.6, 0.7, 0.9])
    thr, recall = recall_threshold(labels, scores, 0.75)
    assert thr == 0.6 and recall == 0.75
    thr, recall = recall_threshold(labels, scores, 1.0)
    assert thr == 0.3 and recall == 1.0
    with pytest.raises(ConfigError, match="both good and defective"):
        recall_threshold(np.zeros(3), np.ones(3), 0.9)


def test_calibration_file_round_trip_and_tamper(tmp_path):
    good = np.linspace(0, 1, 50)
    cal = calibrate("toy", good, good, good, false_reject_rate=0.05, mode="f1", defect_scores=np.array([2.0, 3.0]))
    assert cal.mode == "f1" and cal.n_defective == 2 and cal.image_threshold == 2.0
    path = tmp_path / "calibration.json"
    cal.save(path)
    again = Calibration.load(path)
    assert again.image_threshold == cal.image_threshold and again.normalize(1.5) == cal.normalize(1.5)
    path.write_text(path.read_text().replace('"image_scale": ', '"image_scale": -'))
    with pytest.raises(ModelDirError, match="invalid thresholds"):
        Calibration.load(path)
    path.write_text("{")
    with pytest.raises(ModelDirError, match="not a valid calibration file"):
        Calibration.load(path)


def test_degenerate_good_scores_stay_finite():
    cal = calibrate("toy", np.ones(20), np.ones(20), np.ones(20), false_reject_rate=0.1)
    assert math.isfinite(cal.image_scale) and cal.image_scale > 0
    assert cal.normalize(1.0) == pytest.approx(0.5)


def test_version_1_files_still_load(tmp_path):
    good = np.linspace(0, 1, 50)
    cal = calibrate("toy", good, good, good, false_reject_rate=0.05)
    old = cal.to_dict()
    old["version"] = 1
    old["pixel_center"] = old.pop("pixel_median_good")
    old["achievable_false_reject_rate"] = old.pop("guaranteed_false_reject_rate")
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(old))
    again = Calibration.load(path)
    assert again.pixel_median_good == cal.pixel_median_good
    assert again.guaranteed_false_reject_rate == cal.guaranteed_false_reject_rate
    assert again.normalize_map(np.ones((2, 2))).tolist() == cal.normalize_map(np.ones((2, 2))).tolist()


def test_threshold_estimators_conformal_follows_one_odd_image_fitted_tails_do_not():
    from surfaceinspect.analysis.calibration import threshold_for

    rng = np.random.default_rng(0)
    good = np.exp(rng.normal(0.0, 0.2, size=40))
    odd = np.append(good, 5.0)  # one odd good image
    assert threshold_for(odd, 0.01, "conformal") == 5.0
    for estimator in ("lognormal", "normal"):
        plain, with_odd = threshold_for(good, 0.01, estimator), threshold_for(odd, 0.01, estimator)
        assert abs(with_odd - plain) < 0.05 * plain
    # lognormal: the 99 % quantile of exp(N(0, 0.2)) is exp(0.465) = 1.59; 40 samples land near it
    assert threshold_for(good, 0.01, "lognormal") == pytest.approx(1.59, rel=0.15)
    assert threshold_for(np.array([-1.0, 0.0, 1.0, 2.0]), 0.05, "lognormal") == threshold_for(
        np.array([-1.0, 0.0, 1.0, 2.0]), 0.05, "normal"
    )  # not all positive: the normal fit
    with pytest.raises(ConfigError, match="unknown threshold estimator"):
        threshold_for(good, 0.01, "nosuch")


def test_quantile_calibration_with_a_fitted_tail_estimator():
    rng = np.random.default_rng(1)
    good = np.exp(rng.normal(0.0, 0.2, size=30))
    maxima = good + 0.1
    conformal = calibrate("draem", good, maxima, good, false_reject_rate=0.01)
    fitted = calibrate("draem", good, maxima, good, false_reject_rate=0.01, estimator="lognormal")
    assert conformal.image_threshold == good.max() and conformal.guaranteed_false_reject_rate == pytest.approx(1 / 31)
    assert fitted.guaranteed_false_reject_rate is None and fitted.target["estimator"] == "lognormal"
    assert fitted.image_threshold != conformal.image_threshold and not fitted.notes  # no "cannot guarantee" note


def test_auto_estimator_is_conformal_with_enough_images_and_a_fitted_tail_below():
    from surfaceinspect.analysis.calibration import resolve_estimator

    assert resolve_estimator("auto", 20, 0.01) == "lognormal"
    assert resolve_estimator("auto", 19, 0.01) == "conformal"  # too few to fit a tail to
    assert resolve_estimator("auto", 98, 0.01) == "lognormal" and resolve_estimator("auto", 99, 0.01) == "conformal"
    assert resolve_estimator("auto", 76, 0.02) == resolve_estimator("auto", 76, 0.01)  # one estimator per set
    assert resolve_estimator("normal", 500, 0.01) == "normal"  # an explicit choice stays


def test_auto_thresholds_never_get_stricter_for_a_looser_target():
    good = np.exp(np.random.default_rng(1).normal(0, 0.1, 76))
    thresholds = [threshold_for(good, rate, "auto") for rate in (0.005, 0.01, 0.02, 0.05, 0.1)]
    assert thresholds == sorted(thresholds, reverse=True)


def test_auto_calibration_says_when_it_fits_a_tail():
    rng = np.random.default_rng(0)
    few, many = np.exp(rng.normal(0, 0.2, 30)), np.exp(rng.normal(0, 0.2, 300))
    small = calibrate("draem", few, few, few, false_reject_rate=0.01, estimator="auto")
    assert small.image_threshold == pytest.approx(threshold_for(few, 0.01, "lognormal"))
    assert small.target["estimator"] == "lognormal" and small.guaranteed_false_reject_rate is None
    assert any("too few for a guaranteed false-reject rate" in note for note in small.notes)
    large = calibrate("draem", many, many, many, false_reject_rate=0.01, estimator="auto")
    assert large.image_threshold == pytest.approx(conformal_threshold(many, 0.01)[0])
    assert large.guaranteed_false_reject_rate == pytest.approx(0.01) and "estimator" not in large.target


def test_a_fitted_tail_never_lands_outside_the_plausible_range(tmp_path):
    good = np.exp(np.random.default_rng(0).normal(0.0, 1.5, 30))  # a wide log-normal: its tail reaches far
    bound = good.max() + (good.max() - good.min())
    assert threshold_for(good, 0.001, "lognormal") > bound  # the raw fit would be refused on loading
    cal = calibrate("draem", good, good, good, false_reject_rate=0.001, estimator="lognormal")
    assert good.max() < cal.image_threshold <= bound
    cal.save(tmp_path / "calibration.json")
    assert Calibration.load(tmp_path / "calibration.json").image_threshold == cal.image_threshold  # range check passes
