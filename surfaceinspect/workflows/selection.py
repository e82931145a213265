"""How ``--method auto`` ranks its candidates on the evidence: which evidence counts, the figure, the confidence.

Synthetic evidence comes in kinds (cut-paste, scar, scratch, blur, dent). A kind that no candidate
tells apart from the good images better than chance says nothing about which candidate is better —
on a stochastic texture a patch cut from another image of the same texture is hardly an anomaly —
yet it adds its noise to an AUROC pooled over all kinds. On DAGM Class 1 (session 13) two such kinds
tied CS-Flow ``cpu`` with ``texture`` (0.734 vs 0.733) while the kinds both detect favoured
``texture``, as the real defects do (0.889 vs 0.657). So the ranking figure is the mean per-kind
AUROC over the *informative* kinds: those that at least one candidate separates from the good images
at one-sided p < ``INFORMATIVE_P`` (Mann-Whitney, normal approximation). With equal counts per kind
that is the pooled AUROC of those kinds' anomalies.

Real defects, when the user gives some, rank first; the synthetic figure breaks their ties. How sure
the choice is comes from a paired bootstrap: good images and anomalies resampled together for every
candidate, the share of rounds in which the chosen candidate's figure is at least the runner-up's.

The candidate table (``metadata.json["selection"]``) and its terminal rendering are here too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INFORMATIVE_P = 0.01  # a kind counts when some candidate beats chance on it at this one-sided level
BOOTSTRAP_ROUNDS = 1000
REAL_KIND = "real defects"


@dataclass
class Ranking:
    """The outcome of ranking: the winner, why, and the figures behind it."""

    winner: str
    reason: str
    figures: dict[str, float | None]  # per candidate: the figure it was ranked by
    informative_kinds: list[str] = field(default_factory=list)
    dropped_kinds: list[str] = field(default_factory=list)
    confidence: float | None = None  # share of bootstrap rounds in which the winner stays ahead of the runner-up


def chance_p_value(auroc: float, n_good: int, n_anomalous: int) -> float:
    """One-sided p-value of an AUROC this high if scores did not tell the two groups apart.

    Normal approximation of the Mann-Whitney U statistic (no tie correction, so slightly conservative).
    """
    if n_good < 1 or n_anomalous < 1:
        return 1.0
    sd = math.sqrt((n_good + n_anomalous + 1) / (12.0 * n_good * n_anomalous))
    return 0.5 * math.erfc((auroc - 0.5) / sd / math.sqrt(2.0))


def _win_matrix(good: np.ndarray, anomalous: np.ndarray) -> np.ndarray:
    """1 where an anomaly scores above a good image, 0.5 on a tie (rows anomalies, columns good images)."""
    a, g = anomalous[:, None], good[None, :]
    return (a > g).astype(np.float64) + 0.5 * (a == g)


def _clean(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


class _Scores:
    """One candidate's raw evidence scores, grouped by kind, with nan (unscorable images) left out."""

    def __init__(self, result: dict[str, Any], kinds: Sequence[str]) -> None:
        self.good = _clean(result.get("good_scores") or [])
        synthetic = _clean(result.get("synthetic_scores") or [])
        real = _clean(result.get("real_scores") or [])
        self.by_kind: dict[str, np.ndarray] = {}
        if len(kinds) == synthetic.size:
            for kind in dict.fromkeys(kinds):
                self.by_kind[kind] = synthetic[[i for i, k in enumerate(kinds) if k == kind]]
        if real.size:
            self.by_kind[REAL_KIND] = real

    def auroc(self, kind: str) -> float | None:
        good, anomalous = self.good[np.isfinite(self.good)], self.by_kind[kind]
        anomalous = anomalous[np.isfinite(anomalous)]
        if good.size == 0 or anomalous.size == 0:
            return None
        return float(_win_matrix(good, anomalous).mean())


def informative_kinds(scores: Sequence[_Scores], kinds: Sequence[str]) -> list[str]:
    """The kinds some candidate separates from the good images beyond chance (see the module doc)."""
    keep = []
    for kind in kinds:
        for s in scores:
            value = s.auroc(kind)
            n_good = int(np.isfinite(s.good).sum())
            n_anomalous = int(np.isfinite(s.by_kind[kind]).sum())
            if value is not None and chance_p_value(value, n_good, n_anomalous) < INFORMATIVE_P:
                keep.append(kind)
                break
    return keep


def mean_auroc(s: _Scores, kinds: Sequence[str]) -> float | None:
    """Mean per-kind AUROC over ``kinds`` (None when a kind cannot be computed)."""
    values = [s.auroc(k) for k in kinds]
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))  # type: ignore[arg-type]


def bootstrap_confidence(
    best: _Scores, other: _Scores, kinds: Sequence[str], rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0
) -> float | None:
    """Share of paired bootstrap rounds in which ``best``'s mean per-kind AUROC is at least ``other``'s.

    Both candidates scored the same images, so each round draws one set of weights (multinomial over
    good images, and over each kind's anomalies) and applies it to both.
    """
    finite = np.isfinite(best.good) & np.isfinite(other.good)
    if not kinds or not finite.any():
        return None
    rng = np.random.default_rng(seed)
    n_good = int(finite.sum())
    w_good = rng.multinomial(n_good, np.full(n_good, 1.0 / n_good), size=rounds).T  # (good, rounds)
    diff = np.zeros(rounds)
    for kind in kinds:
        ok = np.isfinite(best.by_kind[kind]) & np.isfinite(other.by_kind[kind])
        n = int(ok.sum())
        if n == 0:
            return None
        w_anom = rng.multinomial(n, np.full(n, 1.0 / n), size=rounds)  # (rounds, anomalies)
        for sign, s in ((1.0, best), (-1.0, other)):
            wins = _win_matrix(s.good[finite], s.by_kind[kind][ok])  # (anomalies, good)
            diff += sign * np.einsum("ra,ag,gr->r", w_anom, wins, w_good) / (n * n_good)
    return float(np.mean(diff >= 0.0))


def rank_candidates(results: Sequence[dict[str, Any]], synthetic_kinds: Sequence[str] = ()) -> Ranking:
    """The best candidate by real-defect AUROC (where there are real defects), then by synthetic evidence.

    ``results`` are in candidate order (cheapest first), which breaks exact ties. ``synthetic_kinds``
    names the kind of each synthetic score, in order; without it (or without raw scores) the stored
    ``auroc_synthetic`` ranks.
    """
    if not results:
        raise ValueError("no candidate to rank")
    scores = [_Scores(r, synthetic_kinds) for r in results]
    all_kinds = [k for k in dict.fromkeys(synthetic_kinds) if all(k in s.by_kind for s in scores)]
    informative = informative_kinds(scores, all_kinds) if all_kinds else []
    used = informative or all_kinds
    synthetic = [
        mean_auroc(s, used) if used else r.get("auroc_synthetic") for s, r in zip(scores, results, strict=True)
    ]
    has_real = any(r.get("auroc_real") is not None for r in results)
    real = [r.get("auroc_real") if has_real else None for r in results]

    def key(i: int) -> tuple[float, float]:
        return (-1.0 if real[i] is None else real[i], -1.0 if synthetic[i] is None else synthetic[i])  # type: ignore[return-value]

    order = sorted(range(len(results)), key=key, reverse=True)  # sorted is stable: earlier wins ties
    best = order[0]
    figures = real if has_real else synthetic
    confidence = None
    if len(order) > 1:
        kinds = [REAL_KIND] if has_real and REAL_KIND in scores[best].by_kind else used
        if kinds and all(k in scores[order[1]].by_kind for k in kinds):
            confidence = bootstrap_confidence(scores[best], scores[order[1]], kinds)
    reason = _reason(results, order, figures, has_real, informative, all_kinds, confidence)
    dropped = [k for k in all_kinds if k not in used]
    by_name = {
        str(r["name"]): (None if f is None else round(float(f), 4)) for r, f in zip(results, figures, strict=True)
    }
    return Ranking(str(results[best]["name"]), reason, by_name, list(used), dropped, confidence)


def _reason(
    results: Sequence[dict[str, Any]],
    order: Sequence[int],
    figures: Sequence[float | None],
    has_real: bool,
    informative: Sequence[str],
    all_kinds: Sequence[str],
    confidence: float | None,
) -> str:
    best = order[0]
    if has_real:
        what = "real defects, then synthetic anomalies"
    elif informative and len(informative) < len(all_kinds):
        what = f"synthetic anomalies of the kinds some candidate detects ({', '.join(informative)})"
    else:
        what = "synthetic anomalies"
    reason = f"highest AUROC on {what}: {_fmt(figures[best])}"
    if len(order) > 1:
        runner_up = order[1]
        reason += f" vs {results[runner_up]['name']} {_fmt(figures[runner_up])}"
        if confidence is not None:
            reason += f"; ahead in {confidence:.0%} of bootstrap resamples"
    return reason


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------
# The candidate table


TABLE_FIELDS = (
    "name",
    "method",
    "profile",
    "sets",
    "steps",
    "planned_steps",
    "train_s",
    "auroc_synthetic",
    "auroc_by_kind",
    "auroc_real",
    "images_per_s",
)


def selection_table(state: dict[str, Any]) -> dict[str, Any]:
    """The candidate table as the model's metadata keeps it (no raw scores)."""
    ranking = state.get("ranking") or {}
    figures = ranking.get("figures", {})
    rows = []
    for c in state["candidates"]:
        result = state["results"][c["name"]]
        row = {k: result.get(k) for k in TABLE_FIELDS}
        row["auroc_evidence"] = figures.get(c["name"], result.get("auroc_synthetic"))
        if "test_image_auroc" in result:  # benchmark: the probe's AUROC on the real test images
            row["test_image_auroc"] = result["test_image_auroc"]
        row["chosen"] = c["name"] == state["winner"]
        rows.append(row)
    first = next(iter(state["results"].values()), {})
    return {
        "chosen": state["winner"],
        "reason": state["reason"],
        "confidence": ranking.get("confidence"),
        "budget_min": state["budget_min"],
        "probe_steps": state["settings"]["probe_steps"],
        "evidence": {
            "good": len(state["calibration_files"]) or None,
            "synthetic": len(first.get("synthetic_scores") or []),
            "real_defects": len(first.get("real_scores") or []),
            "kinds_ranked_by": ranking.get("informative_kinds"),
            "kinds_not_counted": ranking.get("dropped_kinds"),
        },
        "candidates": rows,
    }


def selection_rich_table(selection: dict[str, Any]) -> list[Any]:
    """The candidate table and the operating points as rich renderables (train and benchmark print them)."""
    from rich.table import Table

    rows = selection["candidates"]
    has_real = any(r.get("auroc_real") is not None for r in rows)
    has_test = any(r.get("test_image_auroc") is not None for r in rows)
    table = Table(title=f"Candidates (chosen: {selection['chosen']} — {selection['reason']})", show_header=True)
    for column in ["candidate", "steps", "train min", "AUROC evidence"]:
        table.add_column(column, justify="left" if column == "candidate" else "right")
    if has_real:
        table.add_column("AUROC real defects", justify="right")
    if has_test:
        table.add_column("AUROC test (benchmark)", justify="right")
    table.add_column("img/s", justify="right")
    for r in rows:
        cells = [
            ("✔ " if r["chosen"] else "  ") + r["name"],
            f"{r['steps']}/{r['planned_steps']}",
            f"{r['train_s'] / 60:.1f}",
            _fmt(r.get("auroc_evidence", r.get("auroc_synthetic"))),
        ]
        cells += [_fmt(r.get("auroc_real"))] if has_real else []
        cells += [_fmt(r.get("test_image_auroc"))] if has_test else []
        cells.append(_fmt(r.get("images_per_s"), 1))
        table.add_row(*cells)
    points = Table(title="Operating points (estimated on held-out good images and synthetic anomalies)")
    for column in ["false-reject target", "threshold", "false rejects (held-out)", "catch rate (synthetic)"]:
        points.add_column(column, justify="right")
    has_real_points = any("catch_real" in p for p in selection.get("operating_points", []))
    if has_real_points:
        points.add_column("catch rate (real defects)", justify="right")
    for p in selection.get("operating_points", []):
        cells = [p["false_reject_target"], f"{p['threshold']:.5g}", _fmt(p["false_reject_held_out"])]
        cells += [_fmt(p["catch_synthetic"])] + ([_fmt(p.get("catch_real"))] if has_real_points else [])
        points.add_row(*cells)
    return [table, points]


def _fmt(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
