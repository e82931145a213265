"""benchmarks/speed.py runs on the public API (a smoke test: it must not rot as the package changes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"


@pytest.mark.parametrize(
    ("mode", "extra"),
    [("infer", ["--seconds", "0.05", "--batch", "2"]), ("train", ["--steps", "3", "--images", "8"])],
)
def test_speed_script_reports_rates(mode: str, extra: list[str]) -> None:
    sets = [
        "common.image_size=64",
        "common.batch_size=2",
        "common.workers=0",
        "draem.recon_width=8",
        "draem.disc_width=4",
    ]
    cmd = [sys.executable, str(SCRIPT), "--method", "draem", "--profile", "cpu", "--threads", "1"]
    for item in sets:
        cmd += ["--set", item]
    out = subprocess.run([*cmd, mode, *extra], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)
    assert result["mode"] == mode and result["peak_rss_mb"] > 0
    if mode == "infer":
        assert result["images_per_s_batch1"] > 0 and result["gflop_per_image"] > 0
    else:
        assert result["steps"] == 3 and result["images_per_s"] > 0
