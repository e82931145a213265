"""The inspection workflow through the CLI: train -> score -> heatmap, exit codes, outputs, resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from surfaceinspect.cli import app
from surfaceinspect.errors import EXIT_DEFECT, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREADABLE, EXIT_USAGE
from surfaceinspect.storage import modeldir

TESTS_DIR = Path(__file__).resolve().parent


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def trained(toy_method, synthetic_dataset, tmp_path):
    result = run_cli(
        "train", "--no-export", "--method", "toy", synthetic_dataset / "train" / "good", "--seed", "0", "-q"
    )
    assert result.exit_code == 0, result.output
    return modeldir.latest_run()


def _mixed_folder(synthetic_dataset: Path, dest: Path) -> Path:
    """Good and defective images plus every kind of bad file."""
    (dest / "sub").mkdir(parents=True)
    shutil.copy(synthetic_dataset / "test" / "good" / "000.png", dest / "good_0.png")
    shutil.copy(synthetic_dataset / "test" / "good" / "001.png", dest / "sub" / "good_1.png")
    shutil.copy(synthetic_dataset / "test" / "dent" / "000.png", dest / "dent_0.png")
    (dest / "zero.png").write_bytes(b"")
    (dest / "text.png").write_text("this is not an image")
    (dest / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    data = (synthetic_dataset / "test" / "good" / "002.png").read_bytes()
    (dest / "truncated.png").write_bytes(data[: len(data) // 2])
    (dest / "notes.txt").write_text("ignored: not an image extension")
    return dest


def test_train_score_heatmap_end_to_end(trained, synthetic_dataset, tmp_path):
    assert (trained / "calibration.json").is_file() and (trained / "model.safetensors").is_file()
    cal = json.loads((trained / "calibration.json").read_text())
    assert cal["mode"] == "quantile" and cal["n_good"] == 6  # 20% of 30, min 4

    out_csv = tmp_path / "scores.csv"
    result = run_cli("score", synthetic_dataset / "test", "--output", out_csv)
    assert result.exit_code == EXIT_DEFECT, result.output
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 17
    by_type = {}
    for row in rows:
        by_type.setdefault(row["path"].split("/")[0], []).append(row)
    defect_rows = [r for t in ("dent", "stain", "scratch") for r in by_type[t]]
    assert sum(r["verdict"] == "defect" for r in defect_rows) >= 1
    mean_defect = np.mean([float(r["score"]) for r in defect_rows])
    assert mean_defect > np.mean([float(r["score"]) for r in by_type["good"]])
    for row in rows:
        assert 0.0 <= float(row["score_normalized"]) <= 1.0
        if row["verdict"] == "defect":
            assert int(row["n_regions"]) >= 1 and int(row["bbox_width"]) > 0 and int(row["largest_region_area"]) > 0

    out = tmp_path / "heat"
    result = run_cli("heatmap", synthetic_dataset / "test", "--out", out, "--save-maps")
    assert result.exit_code == EXIT_DEFECT, result.output
    for src in sorted((synthetic_dataset / "test").rglob("*.png")):
        rel = src.relative_to(synthetic_dataset / "test").with_suffix("")
        overlay = cv2.imread(str(out / f"{rel}.png"))
        amap = np.load(out / f"{rel}.npy")
        h, w = cv2.imread(str(src)).shape[:2]
        assert overlay.shape[:2] == (h, w) and amap.shape == (h, w) and amap.dtype == np.float32
    html = (out / "index.html").read_text()
    assert html.count("<img") >= 17


def test_heatmap_npy_is_on_the_score_scale(trained, synthetic_dataset, tmp_path):
    out = tmp_path / "heat"
    jsonl = tmp_path / "r.jsonl"
    run_cli("heatmap", synthetic_dataset / "test" / "dent", "--out", out, "--save-maps", "--output", jsonl, "-q")
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        amap = np.load(out / Path(record["path"]).with_suffix(".npy"))
        # the toy's score is the max of its map; resizing keeps the maximum within a small tolerance
        assert amap.max() == pytest.approx(record["score"], rel=0.05)


def test_mixed_folder_records_and_exit_code(trained, synthetic_dataset, tmp_path):
    folder = _mixed_folder(synthetic_dataset, tmp_path / "dump")
    out = tmp_path / "r.jsonl"
    result = run_cli("score", folder, "--output", out)
    assert result.exit_code == EXIT_DEFECT
    records = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {
        "good_0.png",
        "sub/good_1.png",
        "dent_0.png",
        "zero.png",
        "text.png",
        "corrupt.jpg",
        "truncated.png",
    }
    for bad in ("zero.png", "text.png", "corrupt.jpg", "truncated.png"):
        assert records[bad]["verdict"] == "error" and records[bad]["error"], bad
        assert records[bad]["score"] is None
    assert records["dent_0.png"]["verdict"] == "defect"
    assert records["good_0.png"]["verdict"] in ("good", "defect")

    # no defect but unreadable files -> 3
    for name in ("dent_0.png", "good_0.png", "sub/good_1.png"):
        (folder / name).unlink()
    shutil.copy(synthetic_dataset / "train" / "good" / "000.png", folder / "ok.png")
    result = run_cli("score", folder)
    assert result.exit_code == EXIT_UNREADABLE, result.output


def test_all_good_exits_zero_and_json_goes_to_stdout_only(trained, synthetic_dataset, tmp_path):
    folder = tmp_path / "good"
    folder.mkdir()
    # training images are below the calibrated threshold by construction for this toy model
    for src in sorted((synthetic_dataset / "train" / "good").glob("*.png"))[:3]:
        shutil.copy(src, folder / src.name)
    runner = CliRunner()
    result = runner.invoke(app, ["score", str(folder), "--json"], catch_exceptions=False)
    assert result.exit_code == EXIT_OK, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["verdict"] == "good" for line in lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "{tmp}/nowhere"], "does not exist"),
        (["train", "--method", "toy", "{tmp}/empty"], "no images found"),
        (["train", "--method", "nosuch", "{tmp}/empty"], "unknown method 'nosuch'"),
        (["score", "{tmp}/empty", "--model", "{tmp}/empty"], "not a finished model directory"),
        (["score", "{tmp}/empty"], "no trained model found"),
        (["train", "--method", "toy", "{tmp}/empty", "--image-size", "8"], "image_size=8"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(toy_method, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") <= 2  # one error line (rich may wrap long paths)


def test_too_few_images_for_calibration_is_refused(toy_method, synthetic_dataset, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for src in sorted((synthetic_dataset / "train" / "good").glob("*.png"))[:5]:
        shutil.copy(src, folder / src.name)
    result = CliRunner().invoke(app, ["train", "-m", "toy", str(folder)])
    assert result.exit_code == EXIT_USAGE and "needs at least 6: 4 held out to set the threshold" in result.output


def test_unreadable_training_images_skip_or_stop(toy_method, synthetic_dataset, tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(synthetic_dataset / "train" / "good", folder)
    (folder / "broken.png").write_text("not a png")
    result = CliRunner().invoke(app, ["train", "--no-export", "-m", "toy", str(folder), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "broken.png" in result.output
    meta = json.loads((modeldir.latest_run() / "metadata.json").read_text())
    training = meta["training"]
    if training["n_unreadable_train_images"]:  # the bad file may also land in the calibration split
        assert training["unreadable_train_images"] == ["broken.png"]
    result = CliRunner().invoke(
        app,
        [
            "train",
            "-m",
            "toy",
            str(folder),
            "--set",
            "common.bad_images=stop",
            "--set",
            "common.calibration.min_images=1",
            "--set",
            "common.calibration.fraction=0.01",
        ],
    )
    assert result.exit_code == EXIT_USAGE and "broken.png" in result.output


def test_print_config_shows_effective_values(toy_method):
    result = run_cli("train", "-m", "toy", "--print-config", "--batch-size", "3")
    assert result.exit_code == 0
    assert "batch_size: 3" in result.stdout and "method: toy" in result.stdout


def test_recalibrate_from_good_and_labelled_folders(trained, synthetic_dataset):
    before = json.loads((trained / "calibration.json").read_text())["image_threshold"]
    result = run_cli("recalibrate", synthetic_dataset / "test" / "good", "--false-reject-rate", "0.2")
    assert result.exit_code == 0, result.output
    cal = json.loads((trained / "calibration.json").read_text())
    assert cal["n_good"] == 8 and cal["target"]["false_reject_rate"] == 0.2 and cal["image_threshold"] != before
    result = run_cli("recalibrate", synthetic_dataset / "test", "--labelled", "--mode", "f1")
    assert result.exit_code == 0, result.output
    cal = json.loads((trained / "calibration.json").read_text())
    assert cal["mode"] == "f1" and cal["n_defective"] == 9 and cal["target"]["f1"] > 0.5


def _toy_env(tmp_path: Path) -> dict[str, str]:
    profiles = tmp_path / "toy_profiles"
    profiles.mkdir(exist_ok=True)
    (profiles / "toy-cpu.yaml").write_text(
        "method: toy\ncommon:\n  image_size: 64\n  batch_size: 2\n  workers: 0\n"
        "  calibration:\n    min_images: 4\n    fraction: 0.2\ntoy:\n  epochs: 2\n"
    )
    return {**os.environ, "TOY_PROFILES": str(profiles)}


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_killed_score_leaves_only_complete_records(trained, synthetic_dataset, tmp_path):
    # a slow copy of the model: same weights, 0.3 s per batch
    meta = json.loads((trained / "metadata.json").read_text())
    meta["config"]["toy"]["predict_delay_s"] = 0.3
    (trained / "metadata.json").write_text(json.dumps(meta))
    modeldir.write_sums(trained, changed=["metadata.json"])  # a deliberate change: the manifest follows it
    out = tmp_path / "partial.csv"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(TESTS_DIR / "cli_with_toy.py"),
            "score",
            str(synthetic_dataset / "test"),
            "--model",
            str(trained),
            "--output",
            str(out),
            "--batch-size",
            "2",
            "--workers",
            "0",
            "-q",
        ],
        env=_toy_env(tmp_path),
    )
    part = tmp_path / "partial.csv.part"  # the records go here until the run completes (issue #30, item 2)
    _wait_for(lambda: part.exists() and part.read_text().count("\n") >= 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    text = part.read_text()
    assert text.endswith("\n")
    rows = list(csv.DictReader(text.splitlines()))
    assert 3 <= len(rows) < 17
    assert all(r["verdict"] in ("good", "defect") and float(r["score"]) >= 0 for r in rows)


def _trained_state(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(run_dir / "model.safetensors").items()}


def test_resume_after_kill_matches_uninterrupted_run(toy_method, synthetic_dataset, tmp_path):
    data = synthetic_dataset / "train" / "good"
    env = _toy_env(tmp_path)
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(TESTS_DIR / "cli_with_toy.py"),
            "train",
            "--no-export",
            "-m",
            "toy",
            str(data),
            "--out",
            str(killed_dir),
            "--set",
            "toy.step_delay_s=0.05",
            "--set",
            "common.checkpoint_every_s=0.2",
            "-q",
        ],
        env=env,
    )
    _wait_for(lambda: (killed_dir / "checkpoint.pt").exists())
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "metadata.json").exists(), "the run finished before it could be killed"
    checkpoint = modeldir.load_checkpoint(killed_dir)
    done = int(checkpoint.detector_state["step"])
    assert 0 < done < 48
    assert checkpoint.train_seconds >= 0.05 * (done - 1)  # the checkpoint knows the time already spent

    result = run_cli("train", "--resume", killed_dir, "--no-export", "-q")
    assert result.exit_code == 0, result.output
    meta = json.loads((killed_dir / "metadata.json").read_text())
    assert meta["training"]["resumed"] is True
    # The resumed run counts the time before the kill (its time budget covers both parts).
    assert meta["training"]["seconds"] >= checkpoint.train_seconds
    assert not (killed_dir / "checkpoint.pt").exists()

    result = run_cli(
        "train",
        "--no-export",
        "-m",
        "toy",
        data,
        "--out",
        tmp_path / "full",
        "--set",
        "toy.step_delay_s=0.05",
        "--set",
        "common.checkpoint_every_s=0.2",
        "-q",
    )
    assert result.exit_code == 0, result.output
    resumed, full = _trained_state(killed_dir), _trained_state(tmp_path / "full")
    for key in full:
        np.testing.assert_allclose(resumed[key], full[key], rtol=1e-6)


def test_interrupt_exits_130_and_keeps_checkpoint(toy_method, synthetic_dataset, tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--no-export",
            "-m",
            "toy",
            str(synthetic_dataset / "train" / "good"),
            "--out",
            str(run_dir),
            "--set",
            "toy.fail_at_step=30",
            "--set",
            "common.checkpoint_every_s=0.0001",
            "-q",
        ],
    )
    assert result.exit_code == EXIT_INTERRUPTED
    assert (run_dir / "checkpoint.pt").exists()
    result = run_cli("train", "--resume", run_dir, "--no-export", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "metadata.json").read_text())["training"]["steps"] == 48


def test_run_started_with_a_relative_folder_resumes_from_another_directory(
    toy_method, synthetic_dataset, tmp_path, monkeypatch
):
    monkeypatch.chdir(synthetic_dataset / "train")
    run_dir = tmp_path / "run"
    flags = ["--set", "toy.fail_at_step=10", "--set", "common.checkpoint_every_s=0.0001", "-q"]
    result = CliRunner().invoke(app, ["train", "--no-export", "-m", "toy", "good", "--out", str(run_dir), *flags])
    assert result.exit_code == EXIT_INTERRUPTED
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "good").mkdir(parents=True)  # a same-named folder must not be taken for the data
    monkeypatch.chdir(elsewhere)
    result = run_cli("train", "--resume", run_dir, "--no-export", "-q")
    assert result.exit_code == 0, result.output
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert Path(meta["dataset"]["root"]) == synthetic_dataset / "train" / "good"
    assert meta["training"]["n_train_images"] > 0


def test_resume_latest_finds_the_interrupted_run_in_the_runs_folder(toy_method, synthetic_dataset, isolated_runs):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--no-export",
            "-m",
            "toy",
            str(synthetic_dataset / "train" / "good"),
            "--set",
            "toy.fail_at_step=10",
            "--set",
            "common.checkpoint_every_s=0.0001",
        ],
    )
    assert result.exit_code == EXIT_INTERRUPTED
    result = run_cli("train", "--resume", "latest", "--no-export", "-q")
    assert result.exit_code == 0, result.output
    assert modeldir.latest_run().parent == isolated_runs


def test_missing_backbone_weights_fail_before_reading_images(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    good = tmp_path / "good"
    good.mkdir()
    (good / "not_read.png").write_text("train must fail on the weights before it reads any image")
    result = CliRunner().invoke(app, ["train", "-m", "csflow", str(good), "--profile", "paper", "--device", "cpu"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "efficientnet_b5" in result.output and "--backbone-weights" in result.output
    assert "not_read.png" not in result.output
