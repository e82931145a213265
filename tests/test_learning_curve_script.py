"""benchmarks/learning_curve.py runs on the public API (a smoke test: it must not rot as the package changes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "learning_curve.py"


def tiny_draem_sets(steps: int) -> list[str]:
    """``--set`` items for a DRAEM run of a few seconds on the synthetic dataset (the scripts' smoke tests)."""
    return [
        "common.image_size=64",
        "common.batch_size=2",
        "common.workers=0",
        "common.threads=1",
        "common.time_budget_min=0",
        f"draem.steps={steps}",
        "draem.recon_width=4",
        "draem.disc_width=4",
    ]


@pytest.mark.slow
def test_learning_curve_scores_snapshots_and_the_finished_run(synthetic_dataset: Path, tmp_path: Path) -> None:
    sets = tiny_draem_sets(steps=150)
    out = tmp_path / "curve"
    cmd = [sys.executable, str(SCRIPT), str(synthetic_dataset), "--profile", "cpu", "--every-s", "0.5"]
    cmd += ["--poll-s", "0.1", "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    rows = json.loads((out / "curve.json").read_text())
    snapshots, final = rows[:-1], rows[-1]
    assert final["final"] and final["step"] == 150 and final["pixel_auroc"] is not None
    assert snapshots, "no checkpoint was caught while the run trained"
    steps = [r["step"] for r in snapshots]
    assert steps == sorted(set(steps)) and steps[0] >= 0 and steps[-1] <= 150
    assert all(0.0 <= r["image_auroc"] <= 1.0 and r["train_min"] >= 0 for r in rows)
    assert (out / "curve.md").read_text().count("\n") == len(rows) + 2

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "not empty" in again.stderr
