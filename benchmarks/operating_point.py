"""Which threshold estimator holds its false-reject target on unseen good images, and what it catches.

Reads the raw scores that ``surfaceinspect benchmark`` keeps (``report.json``: every entry's held-out
good scores and test scores; with ``--keep-models``, an auto run's ``selection_scores.json``: every
candidate probe's held-out good and test scores) and sets a threshold from the held-out good scores
alone with each estimator, for each false-reject target; then measures the false-reject rate on the
test's good images and the recall on its defects.

    python benchmarks/operating_point.py BENCH_OUT [BENCH_OUT ...] [--models KEEP_DIR ...] [--json OUT.json]

Estimators (``surfaceinspect.analysis.calibration.threshold_for``): ``conformal`` (the split-conformal order
statistic: the highest held-out score when there are fewer than 1/target - 1 of them) and
``lognormal`` (a normal fit to the log-scores with median and MAD, so one odd image moves it little).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from surfaceinspect.analysis.calibration import ESTIMATORS, threshold_for

TARGETS = (0.01, 0.02, 0.05)


def score_sets(bench_dirs: list[Path], model_dirs: list[Path]) -> list[dict[str, Any]]:
    """(name, held-out good, test scores, test labels) of every detector the inputs hold scores of."""
    sets = []
    for bench in bench_dirs:
        report = json.loads((bench / "report.json").read_text())
        for e in report["entries"]:
            scores = e["accuracy"].get("scores")
            if not scores or not scores["held_out_good"]:
                continue
            name = f"{e['dataset']}/{e['method']}" + (f"->{e['selection']['chosen']}" if e.get("selection") else "")
            sets.append(
                _entry(f"{name} seed {e.get('seed')}", scores["held_out_good"], scores["test"], scores["test_labels"])
            )
            labels = scores["test_labels"]
            for model in model_dirs:
                raw = model / f"{e['dataset']}-{e['method']}" / "selection_scores.json"
                if raw.is_file():
                    for cand, r in json.loads(raw.read_text())["results"].items():
                        if r.get("test_scores"):
                            sets.append(
                                _entry(
                                    f"{e['dataset']}/probe {cand} seed {e.get('seed')}",
                                    r["good_scores"],
                                    r["test_scores"],
                                    labels,
                                )
                            )
    return sets


def _entry(name: str, held_out: list, test: list, labels: list) -> dict[str, Any]:
    keep = [i for i, v in enumerate(test) if v is not None]
    return {
        "name": name,
        "held_out": np.array([v for v in held_out if v is not None], dtype=np.float64),
        "test": np.array([test[i] for i in keep], dtype=np.float64),
        "labels": np.array([labels[i] for i in keep], dtype=bool),
    }


def evaluate(sets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for s in sets:
        good, defect = s["test"][~s["labels"]], s["test"][s["labels"]]
        for estimator in ESTIMATORS:
            for target in TARGETS:
                threshold = threshold_for(s["held_out"], target, estimator)
                rows.append(
                    {
                        "set": s["name"],
                        "n_held_out": int(s["held_out"].size),
                        "estimator": estimator,
                        "target": target,
                        "threshold": round(threshold, 6),
                        "false_reject_test": round(float(np.mean(good >= threshold)), 4),
                        "recall_test": round(float(np.mean(defect >= threshold)), 4),
                    }
                )
    return rows


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Mean test false-reject rate and recall per estimator and target, over every score set."""
    lines = ["| estimator | target | mean FR (test good) | max FR | mean recall | sets |", "|---|---|---|---|---|---|"]
    for estimator in ESTIMATORS:
        for target in TARGETS:
            sel = [r for r in rows if r["estimator"] == estimator and r["target"] == target]
            fr = [r["false_reject_test"] for r in sel]
            rec = [r["recall_test"] for r in sel]
            lines.append(
                f"| {estimator} | {target:g} | {np.mean(fr):.4f} | {np.max(fr):.4f} | {np.mean(rec):.3f} | {len(sel)} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", nargs="+", type=Path, help="benchmark --out folders (report.json)")
    parser.add_argument("--models", nargs="*", type=Path, default=[], help="benchmark --keep-models folders")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()
    rows = evaluate(score_sets(args.bench, args.models))
    print("| set | held-out | estimator | target | threshold | FR test good | recall test |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['n_held_out']} | {r['estimator']} | {r['target']:g} | {r['threshold']:.5g} | "
            f"{r['false_reject_test']:.3f} | {r['recall_test']:.3f} |"
        )
    print()
    print("\n".join(summary(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
