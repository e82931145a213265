"""Would a score fusion of two methods beat each alone? Measured on the scores an auto run keeps.

Reads ``selection_scores.json`` (or an ``auto.json`` state) of ``train/benchmark --method auto`` runs:
every candidate probe's scores on the held-out good images, the synthetic anomalies and (from
``benchmark``) the real test images. Each candidate's scores are normalised by its own held-out good
scores (robust z: (s - median) / (1.4826 MAD)), and every pair of candidates of different methods is
fused by the mean of the two z-scores. Prints the AUROC of each candidate and each fused pair on the
synthetic evidence and on the real test images.

    python benchmarks/fusion.py RUN/selection_scores.json [...] [--labels BENCH_OUT/report.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from surfaceinspect.analysis.metrics import image_auroc


def robust_z(values: np.ndarray, good: np.ndarray) -> np.ndarray:
    centre = np.median(good)
    spread = 1.4826 * np.median(np.abs(good - centre)) or 1e-12
    return (values - centre) / spread


def _array(values: list | None) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values or []], dtype=np.float64)


def _auroc(good: np.ndarray, bad: np.ndarray) -> float:
    ok_g, ok_b = good[np.isfinite(good)], bad[np.isfinite(bad)]
    return image_auroc(np.r_[np.zeros(ok_g.size), np.ones(ok_b.size)], np.r_[ok_g, ok_b])


def analyse(path: Path, test_labels: list[bool] | None) -> list[str]:
    state = json.loads(path.read_text())
    methods = {c["name"]: c["method"] for c in state["candidates"]}
    results = state["results"]
    z = {}
    for name, r in results.items():
        good = _array(r["good_scores"])
        z[name] = {
            "good": robust_z(good, good[np.isfinite(good)]),
            "synthetic": robust_z(_array(r["synthetic_scores"]), good[np.isfinite(good)]),
            "test": robust_z(_array(r.get("test_scores")), good[np.isfinite(good)]),
        }
    labels = np.array(test_labels, dtype=bool) if test_labels else None
    lines = [f"## {path}", "", "| detector | AUROC synthetic | AUROC test |", "|---|---|---|"]

    def row(name: str, parts: dict[str, np.ndarray]) -> str:
        test = "—"
        if labels is not None and parts["test"].size == labels.size:
            test = f"{_auroc(parts['test'][~labels], parts['test'][labels]):.4f}"
        return f"| {name} | {_auroc(parts['good'], parts['synthetic']):.4f} | {test} |"

    lines += [row(name, parts) for name, parts in z.items()]
    for a, b in itertools.combinations(z, 2):
        if methods.get(a) != methods.get(b):
            fused = {k: (z[a][k] + z[b][k]) / 2 if z[a][k].size == z[b][k].size else z[a][k][:0] for k in z[a]}
            lines.append(row(f"{a} + {b}", fused))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", nargs="+", type=Path)
    parser.add_argument("--labels", type=Path, help="benchmark report.json whose test labels the test scores follow")
    args = parser.parse_args()
    labels = None
    if args.labels:
        entry = json.loads(args.labels.read_text())["entries"][0]
        labels = entry["accuracy"]["scores"]["test_labels"]
    for path in args.scores:
        print("\n".join(analyse(path, labels)), end="\n\n")


if __name__ == "__main__":
    main()
