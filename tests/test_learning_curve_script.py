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


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("learning_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ensemble_snapshots_are_told_apart_by_model_and_scored_with_the_trained_models(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from surfaceinspect.detectors.draem.networks import DraemEnsemble

    curve = _load_script()
    (tmp_path / "snapshots").mkdir()
    # Model 2 of 3 reaches the same own step (40) as model 1 did: two snapshots, not one.
    taken = [
        (0, [], 40, 10.0),
        (0, [], 100, 20.0),
        (1, [100], 40, 30.0),
        (1, [100], 40, 31.0),
        (2, [100, 100], 5, 40.0),
    ]
    for i, (member, done, step, seconds) in enumerate(taken):
        state = {"member": member, "members_done": done, "step": step, "model": {"w": torch.full((1,), float(i))}}
        torch.save({"detector_state": state, "train_seconds": seconds}, tmp_path / "snapshots" / f"ckpt_{i:03d}.pt")
    snaps = curve.snapshot_states(tmp_path)
    assert [(s.member, s.step, s.seconds) for s in snaps] == [
        (0, 40, 10.0),
        (0, 100, 20.0),
        (1, 140, 30.0),
        (2, 205, 40.0),
    ]
    assert float(snaps[2].weights["w"]) == 2.0  # the first copy of a repeated step is kept

    nets = [nn.Conv2d(1, 1, 1) for _ in range(3)]
    ensemble = DraemEnsemble(nets)
    assert curve.trained_part(ensemble, 0) is nets[0]
    two = curve.trained_part(ensemble, 1)
    assert isinstance(two, DraemEnsemble) and list(two.members) == nets[:2]
    assert list(curve.trained_part(ensemble, 2).members) == nets
    single = nn.Conv2d(1, 1, 1)
    assert curve.trained_part(single, 0) is single
