"""How ``--method auto`` ranks candidates: informative kinds, the ranking figure, the bootstrap confidence."""

from __future__ import annotations

import numpy as np
import pytest

from surfaceinspect.workflows import selection


def _result(name: str, good: np.ndarray, by_kind: dict[str, np.ndarray], real: np.ndarray | None = None) -> dict:
    kinds = sorted(by_kind)
    n = len(next(iter(by_kind.values())))
    synthetic = [float(by_kind[k][i]) for i in range(n) for k in kinds]  # interleaved, as the evidence cycles kinds
    pooled = selection._Scores({"good_scores": list(good), "synthetic_scores": synthetic}, kinds * n)
    return {
        "name": name,
        "good_scores": [float(v) for v in good],
        "synthetic_scores": synthetic,
        "real_scores": [] if real is None else [float(v) for v in real],
        "auroc_synthetic": selection.mean_auroc(pooled, kinds),
        "auroc_real": None
        if real is None
        else selection._Scores({"good_scores": list(good), "real_scores": list(real)}, []).auroc(selection.REAL_KIND),
    }


def _kinds(by_kind: dict[str, np.ndarray]) -> list[str]:
    n = len(next(iter(by_kind.values())))
    return sorted(by_kind) * n


def test_chance_p_value():
    assert selection.chance_p_value(0.5, 20, 40) == pytest.approx(0.5)
    assert selection.chance_p_value(0.9, 20, 40) < 1e-5
    assert selection.chance_p_value(0.58, 20, 12) > 0.05  # session 13's DAGM cut-paste: not beyond chance


def test_kinds_no_candidate_detects_do_not_decide_the_ranking():
    """The DAGM case: pooled over all kinds "a" leads by noise; on the kind both detect, "b" is far better."""
    rng = np.random.default_rng(0)
    good = rng.normal(0, 1, 40)
    noise_a, noise_b = rng.normal(0.1, 1, 48), rng.normal(-0.1, 1, 48)  # at chance for both
    a = {"blur": rng.normal(1.2, 1, 48), "cutpaste": noise_a, "dent": noise_a[::-1].copy()}
    b = {"blur": rng.normal(3.0, 1, 48), "cutpaste": noise_b, "dent": noise_b[::-1].copy()}
    results = [_result("a", good, a), _result("b", good, b)]
    assert results[0]["auroc_synthetic"] > results[1]["auroc_synthetic"]  # pooled over all kinds: "a" would win
    ranking = selection.rank_candidates(results, _kinds(a))
    assert ranking.winner == "b"
    assert ranking.informative_kinds == ["blur"] and ranking.dropped_kinds == ["cutpaste", "dent"]
    assert "blur" in ranking.reason and ranking.confidence is not None and ranking.confidence > 0.95


def test_all_kinds_count_when_every_kind_is_detected():
    rng = np.random.default_rng(1)
    good = rng.normal(0, 1, 40)
    a = {k: rng.normal(2.0, 1, 30) for k in ("blur", "scar")}
    b = {k: rng.normal(2.5, 1, 30) for k in ("blur", "scar")}
    ranking = selection.rank_candidates([_result("a", good, a), _result("b", good, b)], _kinds(a))
    assert ranking.winner == "b" and ranking.dropped_kinds == [] and ranking.informative_kinds == ["blur", "scar"]
    assert ranking.figures["b"] > ranking.figures["a"]


def test_when_no_kind_is_informative_all_kinds_count():
    rng = np.random.default_rng(2)
    good = rng.normal(0, 1, 20)
    a = {"blur": rng.normal(0, 1, 10)}
    ranking = selection.rank_candidates([_result("a", good, a), _result("b", good, a)], _kinds(a))
    assert ranking.informative_kinds == ["blur"] and ranking.winner == "a"  # a tie goes to the first (cheaper)


def test_real_defects_outrank_synthetic_and_the_confidence_uses_them():
    rng = np.random.default_rng(3)
    good = rng.normal(0, 1, 30)
    syn_a, syn_b = {"scar": rng.normal(3, 1, 30)}, {"scar": rng.normal(1, 1, 30)}
    results = [
        _result("a", good, syn_a, real=rng.normal(0.3, 1, 8)),
        _result("b", good, syn_b, real=rng.normal(3.0, 1, 8)),
    ]
    ranking = selection.rank_candidates(results, _kinds(syn_a))
    assert ranking.winner == "b" and "real defects" in ranking.reason and ranking.confidence > 0.9


def test_bootstrap_confidence_is_deterministic_and_about_a_half_for_equal_candidates():
    rng = np.random.default_rng(4)
    good = rng.normal(0, 1, 30)
    x = {"scar": rng.normal(1, 1, 40)}
    y = {"scar": x["scar"] + rng.normal(0, 0.5, 40)}  # same on average, different per image
    results = [_result("x", good, x), _result("y", good, y)]
    first = selection.rank_candidates(results, _kinds(x))
    assert first.confidence == selection.rank_candidates(results, _kinds(x)).confidence
    assert 0.2 < first.confidence < 0.9


def test_without_raw_scores_the_stored_figure_ranks():
    rows = [{"name": "a", "auroc_synthetic": 0.8, "auroc_real": None}, {"name": "b", "auroc_synthetic": 0.9}]
    ranking = selection.rank_candidates(rows)
    assert ranking.winner == "b" and ranking.confidence is None and ranking.informative_kinds == []
