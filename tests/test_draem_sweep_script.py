"""benchmarks/draem_sweep.py: its per-kernel and ensemble AUROCs are the ones the tool itself reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_learning_curve_script import tiny_draem_sets

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "draem_sweep.py"


@pytest.mark.slow
def test_sweep_scores_like_benchmark_and_averages_seeds(synthetic_dataset: Path, tmp_path: Path) -> None:
    sets = tiny_draem_sets(steps=60)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        json.dumps(
            {
                "profile": "cpu",
                "sets": sets,
                "runs": [{"name": "tiny", "data": str(synthetic_dataset), "seeds": [0, 1]}],
            }
        )
    )
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(SCRIPT), str(plan), "--out", str(out), "--jobs", "1", "--device", "cpu"]
    subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in rows) == [0, 1] and all(r["steps"] == 60 for r in rows)
    ensembles = json.loads((out / "ensembles.json").read_text())
    assert [(e["name"], e["members"], e["subsets"]) for e in ensembles] == [("tiny", 2, [[0, 1]])]
    assert all(0.0 <= e[f"k{k}"] <= 1.0 for e in ensembles for k in (1, 5, 21))

    # The sweep's AUROC at kernel k is what `benchmark --model` reports with draem.smoothing_kernel=k.
    row = next(r for r in rows if r["seed"] == 1)
    for kernel in (5, 21):
        report_dir = tmp_path / f"bench-k{kernel}"
        bench = [sys.executable, "-m", "surfaceinspect", "benchmark", str(synthetic_dataset), "-m", "draem"]
        bench += ["--model", str(out / "work" / "tiny-seed1"), "--set", f"draem.smoothing_kernel={kernel}"]
        bench += ["--out", str(report_dir), "-q"]
        subprocess.run(bench, capture_output=True, text=True, timeout=300, check=True)
        report = json.loads((report_dir / "report.json").read_text())
        measured = report["entries"][0]["accuracy"]["image_auroc"]
        assert measured == pytest.approx(row[f"k{kernel}"]["image_auroc"], abs=1e-3)

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "choose a new --out folder" in again.stderr
