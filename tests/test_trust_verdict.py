"""Plant-grade trust, items 5-11 of issue #30: every verdict made by the right model with plausible
thresholds, traceable afterwards, shown consistently, and watched for drift.

One test (or a small group) per item, through the CLI with the toy detector (tests/toy_detector.py).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import itertools
import json
import re
import shutil
import subprocess
from math import comb
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from surfaceinspect import cli, engine
from surfaceinspect.analysis.drift import ALPHA, DriftMonitor, u_distribution
from surfaceinspect.cli import app
from surfaceinspect.data.synthetic import make_dataset
from surfaceinspect.engine import AspectCheck
from surfaceinspect.errors import EXIT_DEFECT, EXIT_DRIFT, EXIT_OK, EXIT_USAGE, ModelDirError
from surfaceinspect.storage import modeldir
from surfaceinspect.storage.records import FIELDS, LEGACY_FIELDS, format_score

SCORED = (EXIT_OK, EXIT_DEFECT)


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Consoles wide enough that no message is wrapped (assertions look for whole lines)."""
    monkeypatch.setattr(cli, "err_console", Console(stderr=True, width=1000))
    monkeypatch.setattr(cli, "out_console", Console(width=1000))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def refused(result, *phrases: str) -> None:
    """Exit 2 with one error line that contains every phrase, and no traceback."""
    assert result.exit_code == EXIT_USAGE, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for phrase in phrases:
        assert phrase in errors[0], (phrase, errors[0])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def trained(toy_method, synthetic_dataset):
    result = run("train", "--no-export", "-m", "toy", synthetic_dataset / "train" / "good", "-q")
    assert result.exit_code == EXIT_OK, result.output
    return modeldir.latest_run()


def _defect_images(synthetic_dataset: Path, dest: Path) -> Path:
    """Good test images with a large bright patch: defects that score far above the threshold."""
    dest.mkdir()
    for src in sorted((synthetic_dataset / "test" / "good").glob("*.png")):
        image = cv2.imread(str(src))
        image[20:60, 20:60] = 255
        cv2.imwrite(str(dest / src.name), image)
    return dest


# ---------------------------------------------------------------------------------------------- 5


def test_item5_calibration_from_other_model_refused(trained, synthetic_dataset, tmp_path):
    images = synthetic_dataset / "test" / "good"
    other_images = tmp_path / "other"  # other training images: another model of the same method
    shutil.copytree(synthetic_dataset / "train" / "good", other_images)
    for path in sorted(other_images.glob("*.png"))[:10]:
        path.unlink()
    assert (
        run("train", "--no-export", "-m", "toy", other_images, "--out", tmp_path / "other_model", "-q").exit_code
        == EXIT_OK
    )
    own = (trained / "calibration.json").read_bytes()
    assert _json(trained / "calibration.json")["weights_sha256"] == _json(trained / "metadata.json")["weights_sha256"]

    shutil.copy(tmp_path / "other_model" / "calibration.json", trained / "calibration.json")
    refused(run("score", images, "--model", trained), "was made for another toy model", "surfaceinspect recalibrate")
    calibration = json.loads(own)
    calibration["method"] = "draem"  # its own method field names another detector
    _write_json(trained / "calibration.json", calibration)
    refused(run("score", images, "--model", trained), "was made for a draem model", "holds a toy model")

    # recalibrate is the fix it names: it replaces the foreign calibration with one bound to this model
    result = run("recalibrate", images, "--model", trained)
    assert result.exit_code == EXIT_OK, result.output
    assert _json(trained / "calibration.json")["weights_sha256"] == _json(trained / "metadata.json")["weights_sha256"]
    assert run("score", images, "--model", trained, "-q").exit_code in SCORED


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_threshold", 1e9, "image_threshold 1e+09 is outside the plausible range"),
        ("image_threshold", -1e9, "image_threshold -1e+09 is outside the plausible range"),
        ("pixel_threshold", 1e9, "pixel_threshold 1e+09 is outside the plausible range"),
        ("image_threshold", "0.5", "image_threshold is '0.5', not a finite number"),  # text is no threshold
        ("image_threshold", True, "image_threshold is True, not a finite number"),
        ("image_threshold", None, "image_threshold is None, not a finite number"),
    ],
)
def test_item5_absurd_thresholds_refused(trained, synthetic_dataset, field, value, message):
    calibration = _json(trained / "calibration.json")
    calibration[field] = value
    _write_json(trained / "calibration.json", calibration)
    modeldir.write_sums(trained, changed=["calibration.json"])  # even where the manifest vouches for the file
    refused(run("score", synthetic_dataset / "test" / "good", "--model", trained, "-q"), message, "recalibrate")


# ---------------------------------------------------------------------------------------------- 6


def test_item6_model_directory_verified_as_a_whole(trained, synthetic_dataset, tmp_path):
    images = synthetic_dataset / "test" / "good"
    sums = (trained / "SHA256SUMS").read_text(encoding="utf-8")
    names = [line.split("  ")[1] for line in sums.splitlines()]
    assert names == ["calibration.json", "metadata.json", "model.safetensors"]
    if shutil.which("sha256sum"):  # the manifest is plain sha256sum format: checkable without surfaceinspect
        subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=trained, check=True)
    model_id = hashlib.sha256(sums.encode()).hexdigest()[:12]
    result = run("score", images, "--model", trained, "--output", tmp_path / "r.jsonl")
    assert result.exit_code in SCORED and f"model id {model_id}" in result.output, result.output
    assert {r["model_id"] for r in _jsonl(tmp_path / "r.jsonl")} == {model_id}

    metadata = (trained / "metadata.json").read_bytes()
    edited = json.loads(metadata)
    edited["config"]["common"]["tiling"]["enabled"] = True  # the example: tiling switched on by hand
    _write_json(trained / "metadata.json", edited)
    refused(run("score", images, "--model", trained), "metadata.json was changed after the model was written")
    (trained / "metadata.json").write_bytes(metadata)
    assert run("score", images, "--model", trained, "-q").exit_code in SCORED

    (trained / "export-onnx").mkdir()
    (trained / "export-onnx" / "model.onnx").write_bytes(b"a graph nobody checked")
    refused(run("score", images, "--model", trained), "export-onnx/model.onnx was added after the model was written")
    shutil.rmtree(trained / "export-onnx")

    (trained / "SHA256SUMS").write_text(sums + f"{'0' * 64}  ../../etc/passwd\n", encoding="utf-8")
    refused(run("score", images, "--model", trained), "SHA256SUMS line 4 is not a checksum of a model file")
    (trained / "SHA256SUMS").unlink()
    refused(run("score", images, "--model", trained), "SHA256SUMS is missing, but the model was written with one")


def _as_older_version(run_dir: Path) -> None:
    """Make a model folder what an older surfaceinspect wrote: no manifest, no binding, no scores, no aspect range."""
    (run_dir / "SHA256SUMS").unlink()
    metadata = _json(run_dir / "metadata.json")
    del metadata["manifest"], metadata["training"]["image_aspect_range"]
    _write_json(run_dir / "metadata.json", metadata)
    calibration = _json(run_dir / "calibration.json")
    for key in ("weights_sha256", "good_scores", "defect_score_stats", "good_map_max_stats"):
        del calibration[key]
    calibration["version"] = 2
    _write_json(run_dir / "calibration.json", calibration)


def test_item6_old_model_directory_still_loads_with_a_note(trained, synthetic_dataset, tmp_path):
    images = synthetic_dataset / "test" / "good"
    _as_older_version(trained)
    result = run("score", images, "--model", trained, "--output", tmp_path / "r.jsonl")
    assert result.exit_code in SCORED, result.output
    assert "has no SHA256SUMS (written by an older surfaceinspect)" in result.output
    assert "does not name the weights it was made for" in result.output
    assert "drift: not monitored" in result.output
    # an older folder gets the id it would have with a manifest: the hash of the same canonical text
    expected = hashlib.sha256(modeldir.sums_text(modeldir.current_sums(trained)).encode()).hexdigest()[:12]
    assert {r["model_id"] for r in _jsonl(tmp_path / "r.jsonl")} == {expected}

    # recalibrate (or export) with this version migrates it: manifest written, calibration bound
    assert run("recalibrate", images, "--model", trained, "-q").exit_code == EXIT_OK
    assert (trained / "SHA256SUMS").is_file()
    result = run("score", images, "--model", trained)
    assert result.exit_code in SCORED and "older surfaceinspect" not in result.output, result.output


def test_item6_export_folder_has_its_own_manifest(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    for name, content in (("model.onnx", "graph"), ("export.json", "{}"), ("calibration.json", "{}")):
        (folder / name).write_text(content)
    written = modeldir.write_sums(folder, changed=modeldir.EXPORT_FILES)
    assert modeldir.verify_sums(folder, expected=True).model_id == written.model_id
    (folder / "calibration.json").write_text('{"image_threshold": 0}')
    with pytest.raises(ModelDirError, match=r"calibration\.json was changed after the model was written"):
        modeldir.verify_sums(folder, expected=True)
    # rewriting the manifest never vouches for a file changed behind the tool's back
    with pytest.raises(ModelDirError, match=r"calibration\.json was changed"):
        modeldir.write_sums(folder, changed=["model.onnx"])


# ---------------------------------------------------------------------------------------------- 7


def test_item7_recalibrate_on_defect_images_refused_unless_force(trained, synthetic_dataset, tmp_path):
    defects = _defect_images(synthetic_dataset, tmp_path / "defects")
    before = (trained / "calibration.json").read_bytes()
    result = run("recalibrate", defects, "--model", trained)
    refused(result, "looks like defective images", "nothing was changed", "--force")
    assert (trained / "calibration.json").read_bytes() == before and not modeldir.calibration_backups(trained)

    result = run("recalibrate", defects, "--model", trained, "--force")  # a real change of the line: allowed, loudly
    assert result.exit_code == EXIT_OK, result.output
    assert "most of the new good images score above the previous threshold" in result.output
    assert modeldir.calibration_backups(trained)[0].read_bytes() == before
    assert run("score", defects, "--model", trained, "-q").exit_code in SCORED  # the manifest followed


# ---------------------------------------------------------------------------------------------- 8


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grey = cv2.GaussianBlur(rng.normal(128, 30, (height, width)).astype(np.float32), (0, 0), 2.0)
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def test_item8_aspect_warning_uses_the_training_range_and_goes_into_the_record(toy_method, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    sizes = [(100, 70), (64, 64), (60, 90), (40, 100)]  # aspects 0.7 .. 2.5 (MTD's training images: 0.36-2.6)
    for i, (h, w) in zip(range(24), itertools.cycle(sizes), strict=False):
        cv2.imwrite(str(train / f"t{i:02d}.png"), _texture(h, w, i))
    run_dir = tmp_path / "model"
    assert run("train", "--no-export", "-m", "toy", train, "--out", run_dir, "-q").exit_code == EXIT_OK
    assert _json(run_dir / "metadata.json")["training"]["image_aspect_range"] == [0.7, 2.5]

    test = tmp_path / "test"
    test.mkdir()
    cv2.imwrite(str(test / "narrow.png"), _texture(100, 70, 100))  # 0.7 and 2.5: the old median rule (median
    cv2.imwrite(str(test / "wide.png"), _texture(40, 100, 101))  # about 1.2, factor 1.5) warned on both
    cv2.imwrite(str(test / "strip.png"), _texture(60, 4000, 102))  # 66.7: a line-scan strip
    result = run("score", test, "--model", run_dir, "--output", tmp_path / "r.jsonl")
    assert result.exit_code in SCORED, result.output
    records = {r["path"]: r for r in _jsonl(tmp_path / "r.jsonl")}
    assert records["narrow.png"]["warnings"] == [] and records["wide.png"]["warnings"] == []
    assert len(records["strip.png"]["warnings"]) == 1 and "aspect 66.7" in records["strip.png"]["warnings"][0]
    assert "outside the training images' 0.7-2.5" in records["strip.png"]["warnings"][0]
    assert "1 image(s) have an aspect ratio" in result.output and "strip.png" in result.output

    # a model of an older version knows only the median aspect: the median rule still applies
    old = AspectCheck({"image_aspect": 1.2}, tiled=False)
    assert old.allowed == pytest.approx((0.8, 1.8))
    assert AspectCheck({"image_aspect": 1.2, "image_aspect_range": [0.7, 2.5]}, tiled=True).allowed is None


# ---------------------------------------------------------------------------------------------- 9


def test_item9_records_carry_model_id_threshold_runtime_time_and_warnings(trained, synthetic_dataset, tmp_path):
    folder = tmp_path / "dump"
    shutil.copytree(synthetic_dataset / "test" / "good", folder)
    (folder / "broken.png").write_bytes(b"not a png")
    loaded = engine.load(trained)
    assert re.fullmatch(r"[0-9a-f]{12}", loaded.model_id)
    started = dt.datetime.now(dt.timezone.utc)
    assert run("score", folder, "--output", tmp_path / "r.jsonl", "-q").exit_code != EXIT_USAGE
    assert run("score", folder, "--output", tmp_path / "r.csv", "-q").exit_code != EXIT_USAGE
    finished = dt.datetime.now(dt.timezone.utc)

    header = (tmp_path / "r.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header == list(FIELDS) and header[: len(LEGACY_FIELDS)] == list(LEGACY_FIELDS)  # appended, not renamed
    assert header[len(LEGACY_FIELDS) :] == ["model_id", "threshold", "runtime", "time", "warnings"]
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in [*rows, *_jsonl(tmp_path / "r.jsonl")]:  # error records too
        assert row["model_id"] == loaded.model_id and row["runtime"] == "torch"
        assert float(row["threshold"]) == pytest.approx(loaded.calibration.image_threshold)
        assert row["time"].endswith("Z") and started <= dt.datetime.fromisoformat(row["time"]) <= finished
        assert row["warnings"] in ("", [])

    # watch records carry the same fields
    camera = tmp_path / "camera"
    shutil.copytree(synthetic_dataset / "test" / "good", camera)
    watch = ["--model", trained, "--settle", "0.1", "--stop-after", "8"]
    result = run("watch", camera, *watch, "-o", tmp_path / "w.jsonl")
    assert result.exit_code in SCORED, result.output
    watched = _jsonl(tmp_path / "w.jsonl")
    assert len(watched) == 8 and {r["model_id"] for r in watched} == {loaded.model_id}
    assert all(r["threshold"] and r["runtime"] == "torch" and r["time"] for r in watched)

    # files of the earlier field set stay records files: replaced without --force, continued in their own columns
    old = tmp_path / "old.csv"
    old.write_text(",".join(LEGACY_FIELDS) + "\n" + "x.png,good" + "," * (len(LEGACY_FIELDS) - 2) + "\n")
    result = run("watch", camera, *watch, "-o", old)
    assert result.exit_code in SCORED, result.output
    with open(old, newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    assert len(lines) == 10 and {len(line) for line in lines} == {len(LEGACY_FIELDS)}
    assert run("score", folder, "--output", old, "-q").exit_code != EXIT_USAGE


# ---------------------------------------------------------------------------------------------- 10


def test_item10_gallery_agrees_with_records_and_keeps_aspect(trained, synthetic_dataset, tmp_path, monkeypatch):
    from surfaceinspect.analysis import rendering

    folder = tmp_path / "dump"
    shutil.copytree(synthetic_dataset / "test" / "good", folder)
    shutil.copy(synthetic_dataset / "test" / "dent" / "002.png", folder / "dent.png")
    cv2.imwrite(str(folder / "strip.png"), cv2.resize(cv2.imread(str(folder / "000.png")), (400, 60)))
    # a pixel threshold below some good images' maxima (as DRAEM's smoothing gives): hot spots on good images
    calibration = _json(trained / "calibration.json")
    calibration["pixel_threshold"] = calibration["good_map_max_stats"]["min"]
    _write_json(trained / "calibration.json", calibration)
    modeldir.write_sums(trained, changed=["calibration.json"])
    labels: list[str] = []
    render = rendering.render_overlay

    def spy(image, norm_map, label, verdict, **kwargs):
        labels.append(label)
        return render(image, norm_map, label, verdict, **kwargs)

    monkeypatch.setattr(rendering, "render_overlay", spy)
    out = tmp_path / "hm"
    result = run("heatmap", folder, "--out", out, "--output", tmp_path / "r.jsonl", "--save-maps")
    assert result.exit_code in SCORED, result.output
    records = {r["path"]: r for r in _jsonl(tmp_path / "r.jsonl")}
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "normalised" not in page and "(raw" not in page  # one score: the raw score, named "score"

    hot_good = 0
    for path, record in records.items():
        shown = f"score {format_score(record['score'])}"
        assert shown in page and f"{shown}  threshold {format_score(record['threshold'])}" in labels
        overlay = cv2.imread(str(out / Path(path).with_suffix(".png")))
        outlined = bool(np.all(overlay == 255, axis=2).any())  # the outline's inner ring is pure white
        assert outlined == (record["n_regions"] > 0), path  # outlines and regions agree
        if record["verdict"] == "good":
            hot_good += int(np.load(out / Path(path).with_suffix(".npy")).max() >= calibration["pixel_threshold"])
        original_link = re.search(rf'href="([^"]*)"[^>]*title="the original image">{re.escape(path)}<', page)
        assert original_link and (out / original_link.group(1)).resolve() == (folder / path).resolve()
    assert hot_good > 0, "the scenario needs a good image with pixels above the pixel threshold"
    assert records["dent.png"]["verdict"] == "defect" and records["dent.png"]["n_regions"] > 0
    # thumbnails keep the image's aspect, and a strip spans the whole row instead of being a sliver
    strip_card = r'class="card (good|defect) wide"[^>]*>\s*<a class="thumb"[^>]*style="aspect-ratio:400 / 60"'
    assert re.search(strip_card, page)
    assert 'style="aspect-ratio:96 / 96"' in page and "model id" in page and engine.load(trained).model_id in page


# ---------------------------------------------------------------------------------------------- 11


def test_item11_drift_statistic_is_exact_and_its_false_alarm_rate_computed():
    # the exact null distribution of U equals the count over every ordering of two small samples
    for m, n in [(2, 3), (4, 4), (3, 6)]:
        counts = np.zeros(m * n + 1)
        for positions in itertools.combinations(range(m + n), m):
            u = sum(sum(1 for p in positions if p < i) for i in range(m + n) if i not in positions)
            counts[u] += 1
        assert np.allclose(u_distribution(m, n), counts / comb(m + n, m))

    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 1.0, 30)
    monitor = DriftMonitor(reference, threshold=10.0, window=50)
    assert 0.0005 < monitor.false_alarm_rate <= ALPHA  # exact rate per check, shown in the summary
    stable = rng.normal(0.0, 1.0, 50 * 400)  # a stable line: 400 windows of good scores
    alarms = sum(bool(c and c.drifted) for c in (monitor.add("good", s, "x") for s in stable))
    assert alarms <= 3
    shifted = DriftMonitor(reference, threshold=10.0, window=50)
    checks = [c for c in (shifted.add("good", s, "x") for s in rng.normal(-1.5, 1.0, 100)) if c]
    assert all(c.drifted and c.direction == "lower" for c in checks)  # 1.5 standard deviations down: found
    assert "DETECTED in 2 of 2" in shifted.describe() and shifted.record_warning()
    assert not DriftMonitor([0.5], threshold=1.0).available  # one calibration score cannot reach the rate


def test_item11_darker_lighting_is_reported_as_drift(toy_method, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=40, n_test_good=40, n_test_defect_per_type=0, size=48, seed=3)
    # the toy's "brightness" score follows the lighting, as real detectors' scores do
    args = ["--set", "toy.score=brightness", "--set", "common.calibration.fraction=0.5", "--out", tmp_path / "m"]
    assert run("train", "--no-export", "-m", "toy", data / "train" / "good", *args, "-q").exit_code == EXIT_OK
    same = data / "test" / "good"
    darker = tmp_path / "darker"
    darker.mkdir()
    for src in sorted(same.glob("*.png")):
        cv2.imwrite(str(darker / src.name), np.clip(cv2.imread(str(src)).astype(int) - 16, 0, 255).astype(np.uint8))
    window = ["--model", tmp_path / "m", "--drift-window", "15"]

    result = run("score", same, *window)
    assert result.exit_code == EXIT_OK and "drift: none in 2 check(s)" in result.output, result.output
    result = run("score", darker, *window, "--output", tmp_path / "r.jsonl")
    assert result.exit_code == EXIT_OK, result.output  # every image still "good": only drift tells
    assert "drift: DETECTED in 2 of 2 check(s)" in result.output and "lower than at calibration" in result.output
    records = _jsonl(tmp_path / "r.jsonl")
    assert all(r["verdict"] == "good" for r in records)
    marked = [any(w.startswith("drift:") for w in r["warnings"]) for r in records]
    assert marked == [False] * 14 + [True] * 26  # from the window that raised it on
    assert run("score", darker, *window, "--fail-on-drift", "-q").exit_code == EXIT_DRIFT
    result = run("watch", darker, *window, "-o", tmp_path / "w.jsonl", "--settle", "0.1", "--stop-after", "40",
                 "--fail-on-drift")  # fmt: skip
    assert result.exit_code == EXIT_DRIFT, result.output
    assert sum(any(w.startswith("drift:") for w in r["warnings"]) for r in _jsonl(tmp_path / "w.jsonl")) == 26
