"""`surfaceinspect benchmark --quick` on generated data: report fields, masks optional."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surfaceinspect.cli import app

ACCURACY_FIELDS = {
    "image_auroc",
    "image_ap",
    "f1_calibrated",
    "f1_best",
    "f1_best_threshold",
    "threshold",
    "false_reject_rate_test",
    "recall_test",
    "pixel_auroc",
    "aupro",
    "n_empty_masks",
    "per_defect_type",
}
TRAINING_FIELDS = {
    "train_seconds",
    "fit_seconds",
    "epochs",
    "steps",
    "train_images_per_s_first_epoch",
    "train_images_per_s_later_epochs",
    "peak_rss_train_mb",
    "threads",
    "n_calibration_images",
}
INFERENCE_FIELDS = {
    "inference_images_per_s_batch1",
    "inference_images_per_s_batched",
    "batched_batch_size",
    "latency_ms_p50",
    "latency_ms_p95",
    "end_to_end_images_per_s",
    "peak_rss_inference_mb",
}
MACHINE_FIELDS = {"cpu", "cores", "cuda", "device_requested", "torch", "python", "surfaceinspect"}


@pytest.mark.slow
def test_quick_benchmark_report_has_every_field(synthetic_dataset, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        [
            "benchmark",
            str(synthetic_dataset),
            "--method",
            "draem",
            "--method",
            "csflow",
            "--quick",
            "--out",
            str(out),
            "--device",
            "cpu",
            "-q",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["machine"]) >= MACHINE_FIELDS and report["quick"] is True
    assert [e["method"] for e in report["entries"]] == ["draem", "csflow"]
    for entry in report["entries"]:
        assert set(entry["accuracy"]) >= ACCURACY_FIELDS
        assert set(entry["training"]) >= TRAINING_FIELDS
        assert set(entry["inference"]) >= INFERENCE_FIELDS
        acc = entry["accuracy"]
        assert 0.0 <= acc["image_auroc"] <= 1.0 and 0.0 <= acc["pixel_auroc"] <= 1.0 and 0.0 <= acc["aupro"] <= 1.0
        assert set(acc["per_defect_type"]) == {"dent", "scratch", "stain"}
        assert entry["inference"]["inference_images_per_s_batch1"] > 0
        assert entry["training"]["peak_rss_train_mb"] > 100
        assert entry["training"]["train_images_per_s_first_epoch"] > 0
    md = (out / "report.md").read_text()
    assert "| synthetic0 | draem |" in md and "## Cost" in md
    assert (out / "roc_synthetic0.png").stat().st_size > 1000


@pytest.mark.slow
def test_dataset_without_masks_skips_pixel_metrics(synthetic_dataset, tmp_path):
    data = tmp_path / "nomask"
    shutil.copytree(synthetic_dataset, data, ignore=shutil.ignore_patterns("ground_truth"))
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        [
            "benchmark",
            str(data),
            "--method",
            "csflow",
            "--quick",
            "--out",
            str(out),
            "--device",
            "cpu",
            "-q",
            "--keep-models",
            str(tmp_path / "models"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    # --keep-models leaves a complete run directory that score can use
    kept = tmp_path / "models" / "nomask-csflow"
    assert (kept / "metadata.json").is_file() and (kept / "calibration.json").is_file()
    scored = CliRunner().invoke(app, ["score", str(data / "test" / "good"), "--model", str(kept), "--json", "-q"])
    assert scored.exit_code in (0, 1) and scored.stdout.count('"verdict"') == 8, scored.output
    entry = json.loads((out / "report.json").read_text())["entries"][0]
    assert entry["has_masks"] is False
    assert entry["accuracy"]["pixel_auroc"] is None and entry["accuracy"]["aupro"] is None
    assert "pixel_auroc" not in entry["accuracy"]["per_defect_type"]["dent"]
    assert entry["accuracy"]["image_auroc"] == entry["accuracy"]["image_auroc"]  # not nan


def test_benchmark_refuses_model_with_several_datasets(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "benchmark",
            str(tmp_path),
            str(tmp_path),
            "--method",
            "draem",
            "--model",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "one trained run" in result.output


def test_benchmark_on_bad_layout_is_one_line(tmp_path: Path):
    result = CliRunner().invoke(app, ["benchmark", str(tmp_path), "--method", "csflow", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.slow
def test_seeds_are_aggregated_and_kept_runs_rescored(synthetic_dataset, tmp_path):
    out, kept = tmp_path / "bench", tmp_path / "models"
    result = CliRunner().invoke(
        app,
        [
            "benchmark",
            str(synthetic_dataset),
            "--method",
            "csflow",
            "--quick",
            "--seed",
            "0",
            "--seed",
            "1",
            "--out",
            str(out),
            "--device",
            "cpu",
            "-q",
            "--keep-models",
            str(kept),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [e["seed"] for e in report["entries"]] == [0, 1]
    (agg,) = report["aggregates"]
    assert agg["seeds"] == [0, 1] and agg["method"] == "csflow"
    aurocs = [e["accuracy"]["image_auroc"] for e in report["entries"]]
    assert agg["accuracy"]["image_auroc"]["mean"] == pytest.approx(sum(aurocs) / 2)
    assert "## Across seeds" in (out / "report.md").read_text()

    # Re-scoring a kept run with another inference setting recalibrates on its held-out images
    run = kept / f"{synthetic_dataset.name}-csflow-seed1"
    before = (run / "calibration.json").read_text()
    rescored = CliRunner().invoke(
        app,
        [
            "benchmark",
            str(synthetic_dataset),
            "--method",
            "csflow",
            "--model",
            str(run),
            "--set",
            "csflow.map_sigma=0",
            "--out",
            str(tmp_path / "re"),
            "-q",
            "--device",
            "cpu",
        ],
        catch_exceptions=False,
    )
    assert rescored.exit_code == 0, rescored.output
    entry = json.loads((tmp_path / "re" / "report.json").read_text())["entries"][0]
    assert entry["config"]["csflow"]["map_sigma"] == 0.0
    assert entry["calibration"]["n_good"] == report["entries"][1]["calibration"]["n_good"]
    assert (run / "calibration.json").read_text() == before  # the run's files are not changed

    refused = CliRunner().invoke(
        app,
        [
            "benchmark",
            str(synthetic_dataset),
            "--method",
            "csflow",
            "--model",
            str(run),
            "--set",
            "csflow.epochs=3",
            "--out",
            str(tmp_path / "x"),
            "-q",
        ],
    )
    assert refused.exit_code == 2 and "inference settings" in refused.output


@pytest.mark.slow
def test_quick_benchmark_of_auto_reports_candidates_rank_agreement_and_operating_points(synthetic_dataset, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        ["benchmark", str(synthetic_dataset), "--quick", "--out", str(out), "--device", "cpu", "-q"],
        catch_exceptions=False,
    )  # no --method: auto
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "report.json").read_text())["entries"][0]
    assert entry["method"] == "auto"
    rows = entry["selection"]["candidates"]
    assert [r["name"] for r in rows] == ["csflow-cpu", "draem-cpu", "draem-texture", "csflow-texture"]
    assert sum(r["chosen"] for r in rows) == 1 and all(0 <= r["test_image_auroc"] <= 1 for r in rows)
    assert [p["false_reject_target"] for p in entry["accuracy"]["operating_points"]] == [0.01, 0.02, 0.05]
    assert len(entry["accuracy"]["scores"]["test"]) == entry["n_test_good"] + entry["n_test_defective"]
    md = (out / "report.md").read_text()
    assert "## Detector selection (--method auto)" in md and "| Spearman |" in md
    assert "## Operating points" in md
