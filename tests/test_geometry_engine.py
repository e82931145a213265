"""Image geometry through the CLI and engine: HxW and keep:L sizes, tiled training and scoring,
the aspect warning, and the training plan (resume keeps its settings; method options)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from surfaceinspect import engine
from surfaceinspect.cli import app
from surfaceinspect.config import parse_image_size
from surfaceinspect.errors import EXIT_DEFECT, EXIT_OK, EXIT_USAGE
from surfaceinspect.storage import modeldir


def run_cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _strip(rng: np.random.Generator, height: int, width: int, defect: bool = False) -> np.ndarray:
    """A grey line-scan-like strip: smooth horizontal texture, optionally one small bright spot."""
    base = 110 + 15 * np.sin(np.arange(width) / 5.0)[None, :] + rng.normal(0, 3, (height, width))
    image = np.repeat(base[..., None], 3, axis=2)
    if defect:
        y, x = height // 2, int(width * 0.7)
        image[y - 3 : y + 3, x - 3 : x + 3] = 250
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture
def strips(tmp_path) -> Path:
    """30 good strips 48x160 (H x W) for training, plus a test folder with good and defective strips."""
    rng = np.random.default_rng(0)
    root = tmp_path / "strips"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for i in range(30):
        cv2.imwrite(str(root / "train" / f"s{i:02d}.png"), _strip(rng, 48, 160))
    for i in range(3):
        cv2.imwrite(str(root / "test" / f"good{i}.png"), _strip(rng, 48, 160))
    cv2.imwrite(str(root / "test" / "defect.png"), _strip(rng, 48, 160, defect=True))
    return root


def _metadata(run_dir: Path) -> dict:
    return json.loads((run_dir / "metadata.json").read_text())


def test_image_size_forms_parse():
    assert parse_image_size("256") == 256
    assert parse_image_size("128x512") == [128, 512]
    assert parse_image_size("[128, 512]") == [128, 512]
    assert parse_image_size("keep:512") == "keep:512"


def test_keep_aspect_is_resolved_from_the_training_images_and_stored(toy_method, strips, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", "--no-export", "-m", "toy", strips / "train", "--image-size", "keep:128", "--out", run_dir, "-q"
    )
    assert result.exit_code == EXIT_OK, result.output
    meta = _metadata(run_dir)
    # aspect 160/48 = 3.33: long side 128, short side 38.4 -> 38 (the toy method needs no multiple)
    assert meta["config"]["common"]["image_size"] == [38, 128]
    assert meta["training"]["image_aspect"] == pytest.approx(160 / 48, rel=1e-3)
    loaded = engine.load(run_dir)
    assert loaded.detector.input_size == (38, 128)

    records = tmp_path / "r.jsonl"
    result = run_cli("score", strips / "test", "--model", run_dir, "-o", records, "-q")
    assert result.exit_code in (EXIT_OK, EXIT_DEFECT), result.output
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert {(r["width"], r["height"]) for r in rows} == {(160, 48)}


def test_hxw_size_and_maps_at_the_images_resolution(toy_method, strips, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", "--no-export", "-m", "toy", strips / "train", "--image-size", "32x96", "--out", run_dir, "-q"
    )
    assert result.exit_code == EXIT_OK, result.output
    assert _metadata(run_dir)["config"]["common"]["image_size"] == [32, 96]
    out = tmp_path / "heat"
    result = run_cli("heatmap", strips / "test", "--model", run_dir, "--out", out, "--save-maps", "-q")
    assert result.exit_code in (EXIT_OK, EXIT_DEFECT), result.output
    saved = np.load(out / "defect.npy")
    assert saved.shape == (48, 160)
    assert cv2.imread(str(out / "defect.png")).shape[:2] == (48, 160)


def test_scoring_images_of_another_aspect_warns(toy_method, strips, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", "--no-export", "-m", "toy", strips / "train", "--image-size", "32x96", "--out", run_dir, "-q"
    )
    assert result.exit_code == EXIT_OK, result.output
    square = tmp_path / "square"
    square.mkdir()
    cv2.imwrite(str(square / "tall.png"), _strip(np.random.default_rng(1), 160, 48))
    result = CliRunner().invoke(app, ["score", str(square), "--model", str(run_dir)], catch_exceptions=False)
    assert "aspect ratio" in result.output and "tall.png" in result.output
    result = CliRunner().invoke(app, ["score", str(strips / "test"), "--model", str(run_dir)], catch_exceptions=False)
    assert "aspect ratio" not in result.output


def test_tiled_training_and_scoring_find_a_small_defect_at_full_resolution(toy_method, strips, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", "--no-export", "-m", "toy", strips / "train", "--image-size", "32",
        "--set", "common.tiling.enabled=true", "--set", "common.tiling.overlap=0.25", "--out", run_dir, "-q",
    )  # fmt: skip
    assert result.exit_code == EXIT_OK, result.output
    training = _metadata(run_dir)["training"]
    assert training["n_train_images"] == 24 and training["n_train_inputs"] > 30  # several tiles per strip
    records = tmp_path / "r.jsonl"
    out = tmp_path / "heat"
    result = run_cli(
        "heatmap", strips / "test", "--model", run_dir, "--out", out, "--save-maps", "--output", records, "-q"
    )
    assert result.exit_code == EXIT_DEFECT, result.output
    rows = {r["path"]: r for r in map(json.loads, records.read_text().splitlines())}
    assert rows["defect.png"]["verdict"] == "defect"
    assert all(rows[f"good{i}.png"]["verdict"] == "good" for i in range(3))
    stitched = np.load(out / "defect.npy")
    assert stitched.shape == (48, 160)
    y, x = np.unravel_index(np.argmax(stitched), stitched.shape)
    assert abs(y - 24) <= 6 and abs(x - 112) <= 6  # the hottest pixel is the spot, at full resolution
    bbox = rows["defect.png"]
    assert bbox["bbox_x"] <= 112 <= bbox["bbox_x"] + bbox["bbox_width"]


def test_resume_refuses_other_flags_and_keeps_the_calibration_folder(toy_method, synthetic_dataset, tmp_path):
    result = run_cli("train", "--resume", tmp_path / "nothing", "--epochs", "3", "-q")
    assert result.exit_code == EXIT_USAGE
    assert "--epochs" in result.output and "--resume" in result.output

    checkpoint = modeldir.TrainCheckpoint(
        {"method": "toy"}, "/data", ["a.png"], [], {"step": 1}, 2.0, calibration_dir=str(synthetic_dataset / "test")
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    modeldir.save_checkpoint(run_dir, checkpoint)
    assert modeldir.load_checkpoint(run_dir).calibration_dir == str(synthetic_dataset / "test")
    plan = engine.plan_resume(run_dir, reporter=engine.Reporter(quiet=True))
    assert plan.calibration_dir == synthetic_dataset / "test" and plan.resumed and plan.seconds_before == 2.0


def test_method_options_come_from_the_method_config(toy_method, synthetic_dataset):
    result = run_cli("train", "-m", "draem", "--anomaly-source", "fractal", "--print-config")
    assert result.exit_code == EXIT_OK, result.output
    assert "anomaly_source: fractal" in result.output
    result = run_cli("train", "-m", "toy", synthetic_dataset / "train" / "good", "--backbone-weights", "w.pth", "-q")
    assert result.exit_code == EXIT_USAGE
    assert "--backbone-weights does not apply to method toy" in result.output
    help_text = run_cli("train", "--help").output
    assert "--anomaly-source" in help_text and "--backbone-weights" in help_text
    assert "auto, csflow, draem" in " ".join(help_text.replace("│", " ").split())  # --method help: the registry


def test_cli_import_does_not_load_torch():
    code = "import sys, surfaceinspect.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
