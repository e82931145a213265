"""Scoring an exported model without torch (issue #31): what the ``surfaceinspect-runtime`` install runs.

Each method trains a tiny model with its export (in this process, with torch); then the real CLI
runs in a child process in which torch, torchvision, onnx, scikit-learn, SciPy and safetensors
cannot be imported (``tests/cli_without_torch.py``, as if not installed). score, heatmap, watch and
serve must work there and give the records the torch runtime gives, within the export's parity
tolerance; commands that need torch must say so in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_process import free_port, serve_process
from tiny_exports import TRAIN_ARGS
from typer.testing import CliRunner

from surfaceinspect.cli import app
from surfaceinspect.deploy import runtimes
from surfaceinspect.deploy.export import RTOL
from surfaceinspect.detectors import available_methods
from surfaceinspect.errors import EXIT_DEFECT, EXIT_OK, EXIT_USAGE

pytest.importorskip("onnxruntime")

TESTS_DIR = Path(__file__).resolve().parent
WITHOUT_TORCH = TESTS_DIR / "cli_without_torch.py"

pytestmark = pytest.mark.slow  # trains and exports a tiny model per method (~1 min on a loaded CPU)


@pytest.fixture(scope="module", params=available_methods())
def exported_run(request, synthetic_dataset, tmp_path_factory) -> Path:
    """A tiny trained run of each method with its RUN/export-onnx, written by train."""
    run_dir = tmp_path_factory.mktemp(f"torch_free_{request.param}") / "run"
    args = ["train", "--method", request.param, str(synthetic_dataset / "train" / "good"), "--out", str(run_dir),
            "--threads", "1", "--workers", "0", "--set", "common.time_budget_min=0",
            *TRAIN_ARGS[request.param]]  # fmt: skip
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == EXIT_OK, result.output
    assert runtimes.is_export_dir(run_dir / runtimes.DEFAULT_EXPORT_SUBDIR)
    return run_dir


def without_torch(*args: object, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a child process where torch & co. are not importable."""
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR.parent), "COLUMNS": "200"}
    command = [sys.executable, str(WITHOUT_TORCH), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_score_without_torch_gives_the_records_of_the_torch_runtime(exported_run, synthetic_dataset):
    images = synthetic_dataset / "test"
    slim = without_torch("score", images, "--model", exported_run, "--json", "--workers", "2")
    assert slim.returncode in (EXIT_OK, EXIT_DEFECT), slim.stderr
    full = CliRunner().invoke(
        app, ["score", str(images), "--model", str(exported_run), "--json", "--runtime", "torch", "-q"]
    )
    assert full.exit_code == slim.returncode, full.output
    slim_records, torch_records = _jsonl(slim.stdout), _jsonl(full.stdout)
    assert len(slim_records) == len(torch_records) > 10
    threshold = json.loads((exported_run / "calibration.json").read_text())["image_threshold"]
    for a, b in zip(torch_records, slim_records, strict=True):
        assert (a["runtime"], b["runtime"]) == ("torch", "onnx")
        assert a["path"] == b["path"] and a["verdict"] == b["verdict"] and a["n_regions"] == b["n_regions"]
        assert (a["width"], a["height"], a["model_id"]) == (b["width"], b["height"], b["model_id"])
        assert abs(a["score"] - b["score"]) <= RTOL * max(abs(a["score"]), abs(threshold))
    assert {r["verdict"] for r in slim_records} == {"good", "defect"}  # both verdicts were exercised


def test_heatmap_and_watch_without_torch(exported_run, synthetic_dataset, tmp_path):
    images = synthetic_dataset / "test"
    out = tmp_path / "overlays"
    heatmap = without_torch("heatmap", images, "--model", exported_run, "--out", out, "-q")
    assert heatmap.returncode in (EXIT_OK, EXIT_DEFECT), heatmap.stderr
    n_images = len(list(images.rglob("*.png")))
    assert len([p for p in out.rglob("*.png") if "overlay" in p.name or p.parent != out]) >= n_images
    assert (out / "index.html").is_file()

    camera = tmp_path / "camera"
    camera.mkdir()
    for path in sorted((images / "dent").glob("*.png"))[:2] + sorted((images / "good").glob("*.png"))[:2]:
        (camera / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    records = tmp_path / "watch.jsonl"
    watch = without_torch("watch", camera, "--model", exported_run, "-o", records, "--idle-timeout", "2", "--settle",
                          "0.2", "-q")  # fmt: skip
    assert watch.returncode in (EXIT_OK, EXIT_DEFECT), watch.stderr
    rows = _jsonl(records.read_text())
    assert sorted(r["path"] for r in rows) == sorted(p.name for p in camera.iterdir())
    assert {r["runtime"] for r in rows} == {"onnx"}


def test_serve_without_torch_answers_and_stops_on_sigterm(exported_run, synthetic_dataset):
    import httpx2

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR.parent)}
    command = [sys.executable, str(WITHOUT_TORCH), "serve", "--model", str(exported_run), "--port", str(port)]
    with serve_process(command, env, port) as served:
        base = served.base
        body = (synthetic_dataset / "test" / "good" / "000.png").read_bytes()
        scored = httpx2.post(f"{base}/score", content=body, headers={"Content-Type": "image/png"}, timeout=60)
        assert scored.status_code == 200 and scored.json()["runtime"] == "onnx"
        overlay = httpx2.post(f"{base}/heatmap", content=body, headers={"Content-Type": "image/png"}, timeout=60)
        assert overlay.status_code == 200 and overlay.content.startswith(b"\x89PNG")
        bad = httpx2.post(f"{base}/score", content=b"not an image", timeout=60)
        assert bad.status_code in (400, 415, 422)
        assert "surfaceinspect_requests_total" in httpx2.get(f"{base}/metrics", timeout=10).text
    assert served.proc.returncode == EXIT_OK, served.stderr


def test_commands_that_need_torch_say_so_in_one_line(exported_run, synthetic_dataset, tmp_path):
    for args in (
        ["train", "-m", "draem", synthetic_dataset / "train" / "good", "--out", tmp_path / "run", "--no-export"],
        ["score", synthetic_dataset / "test", "--model", exported_run, "--runtime", "torch"],
        ["export", "--model", exported_run, "--out", tmp_path / "export"],
        ["demo", "--out", tmp_path / "demo"],
        ["benchmark", synthetic_dataset, "--out", tmp_path / "bench"],
    ):
        result = without_torch(*args)
        assert result.returncode == EXIT_USAGE, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "pip install surfaceinspect" in lines[0], lines
    assert not [p.name for p in tmp_path.iterdir()]  # refused before writing anything
    version = without_torch("--version")
    assert version.returncode == EXIT_OK and version.stdout.startswith("surfaceinspect ")
    profiles = without_torch("profiles")
    assert profiles.returncode == EXIT_OK and "draem" in profiles.stdout and "csflow" in profiles.stdout


def test_the_full_install_scores_an_export_on_a_cpu_machine_without_importing_torch(exported_run, synthetic_dataset):
    """`--device auto` asks torch for a GPU only where a GPU driver exists: on a line PC without one, the full
    install starts as fast as the runtime (torch's import alone costs about 2 s and 500 MB)."""
    from surfaceinspect.device import gpu_possible

    if gpu_possible():
        pytest.skip("a GPU driver is present: --device auto must ask torch")
    image = synthetic_dataset / "test" / "good" / "000.png"
    code = (
        "import sys; from pathlib import Path; from surfaceinspect import engine; "
        f"m = engine.load({str(exported_run)!r}, device='auto'); "
        f"r = list(engine.run_inference([Path({str(image)!r})], Path('.'), m.detector, m.calibration, "
        "batch_size=1, workers=0)); "
        "print(m.runtime, r[0].record.verdict, 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    runtime, verdict, torch_loaded = result.stdout.split()
    assert runtime == "onnx" and verdict in ("good", "defect") and torch_loaded == "False"


def test_recalibrate_without_torch_sets_the_thresholds_the_full_install_sets(exported_run, synthetic_dataset,
                                                                             tmp_path):  # fmt: skip
    """After a relamp the line PC recalibrates itself, also on a few real defects (f1: no scikit-learn there)."""
    slim_run, full_run = tmp_path / "slim", tmp_path / "full"
    shutil.copytree(exported_run, slim_run)
    shutil.copytree(exported_run, full_run)
    labelled = tmp_path / "labelled"  # held-out good images of the training folder and the test set's defects
    shutil.copytree(synthetic_dataset / "train" / "good", labelled / "good")
    for defect in (d for d in (synthetic_dataset / "test").iterdir() if d.is_dir() and d.name != "good"):
        shutil.copytree(defect, labelled / defect.name)
    args = ["recalibrate", labelled, "--labelled", "--calibration-mode", "f1", "-q"]
    slim = without_torch(*args, "--model", slim_run)
    assert slim.returncode == EXIT_OK, slim.stderr
    full = CliRunner().invoke(app, [str(a) for a in [*args, "--model", full_run]])
    assert full.exit_code == EXIT_OK, full.output
    slim_cal, full_cal = (json.loads((run / "calibration.json").read_text()) for run in (slim_run, full_run))
    assert slim_cal["mode"] == full_cal["mode"] == "f1"
    assert slim_cal["image_threshold"] == pytest.approx(full_cal["image_threshold"], rel=RTOL, abs=1e-6)
    assert slim_cal != json.loads((exported_run / "calibration.json").read_text())
    scored = without_torch("score", synthetic_dataset / "test" / "good", "--model", slim_run, "--json")
    assert scored.returncode in (EXIT_OK, EXIT_DEFECT), scored.stderr  # the new calibration is the run's own
