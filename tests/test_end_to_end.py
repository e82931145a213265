"""The used-by commands with the real detectors (tiny settings): train DIR, then score/heatmap DIR."""

from __future__ import annotations

import csv
import os
import shutil

import pytest
from typer.testing import CliRunner

from surfaceinspect.cli import app
from surfaceinspect.detectors import available_methods
from surfaceinspect.errors import EXIT_DEFECT, EXIT_OK, EXIT_UNREADABLE

TINY = {
    "draem": [
        "--image-size",
        "64",
        "--set",
        "draem.steps=20",
        "--set",
        "draem.recon_width=8",
        "--set",
        "draem.disc_width=4",
        "--set",
        "draem.recon_levels=3",
        "--set",
        "draem.disc_levels=3",
        "--set",
        "common.time_budget_min=0",
    ],
    "csflow": [
        "--image-size",
        "128",
        "--epochs",
        "2",
        "--set",
        "csflow.hidden_channels=16",
        "--set",
        "common.time_budget_min=0",
    ],
}


@pytest.mark.parametrize("method", available_methods())
def test_used_by_commands_work_as_written(method, synthetic_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(synthetic_dataset / "train" / "good", "good_images")
    shutil.copytree(synthetic_dataset / "test", "line_camera_dump")
    (tmp_path / "line_camera_dump" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    runner = CliRunner()
    # --no-export: train's ONNX export of both methods is tested in test_export.py
    result = runner.invoke(
        app,
        [
            "train",
            "--method",
            method,
            "./good_images",
            "--threads",
            "1",
            "--no-export",
            "--workers",
            "0",
            *TINY[method],
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == EXIT_OK, result.output
    result = runner.invoke(app, ["score", "./line_camera_dump", "--output", "out.csv"], catch_exceptions=False)
    # broken.png is unreadable: exit 1 if the (barely trained) model flags a defect, else 3
    assert result.exit_code in (EXIT_DEFECT, EXIT_UNREADABLE), result.output
    assert f"({method}," in result.output  # says which model it used
    with open("out.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 18
    assert [r["verdict"] for r in rows if r["path"] == "broken.png"] == ["error"]
    assert all(r["score"] for r in rows if r["path"] != "broken.png")
    result = runner.invoke(app, ["heatmap", "./line_camera_dump", "--out", "heat"], catch_exceptions=False)
    assert result.exit_code in (EXIT_DEFECT, EXIT_UNREADABLE), result.output
    assert (tmp_path / "heat" / "index.html").is_file() and (tmp_path / "heat" / "dent" / "000.png").is_file()
