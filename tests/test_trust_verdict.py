"""Plant-grade trust, items 5-11 of issue #30: every verdict made by the right model with plausible
thresholds, traceable afterwards, shown consistently, and watched for drift.

One test (or a small group) per item, through the CLI with the toy detector (tests/toy_detector.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import pytest
from rich.console import Console
from typer.testing import CliRunner

from surfaceinspect import cli, modeldir
from surfaceinspect.cli import app
from surfaceinspect.errors import EXIT_DEFECT, EXIT_OK, EXIT_USAGE, ModelDirError

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
    result = run("train", "-m", "toy", synthetic_dataset / "train" / "good", "-q")
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
    assert run("train", "-m", "toy", other_images, "--out", tmp_path / "other_model", "-q").exit_code == EXIT_OK
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
    result = run("score", images, "--model", trained)
    assert result.exit_code in SCORED and f"model id {model_id}" in result.output, result.output

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
    del metadata["manifest"]
    _write_json(run_dir / "metadata.json", metadata)
    calibration = _json(run_dir / "calibration.json")
    for key in ("weights_sha256", "good_scores", "defect_score_stats", "good_map_max_stats"):
        del calibration[key]
    calibration["version"] = 2
    _write_json(run_dir / "calibration.json", calibration)


def test_item6_old_model_directory_still_loads_with_a_note(trained, synthetic_dataset, tmp_path):
    images = synthetic_dataset / "test" / "good"
    _as_older_version(trained)
    result = run("score", images, "--model", trained)
    assert result.exit_code in SCORED, result.output
    assert "has no SHA256SUMS (written by an older surfaceinspect)" in result.output
    assert "does not name the weights it was made for" in result.output
    # an older folder gets the id it would have with a manifest: the hash of the same canonical text
    expected = hashlib.sha256(modeldir.sums_text(modeldir.current_sums(trained)).encode()).hexdigest()[:12]
    assert f"model id {expected}" in result.output

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
