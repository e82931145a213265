"""`surfaceinspect export` and `--runtime onnx`: round trip, parity, refusals (generated data, tiny models)."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_exports import TRAIN_ARGS
from typer.testing import CliRunner

from surfaceinspect import engine
from surfaceinspect.cli import app
from surfaceinspect.deploy import runtimes
from surfaceinspect.deploy.export import RTOL, ExportError, export_run
from surfaceinspect.detectors import Scorer, available_methods
from surfaceinspect.errors import EXIT_OK, EXIT_USAGE, ModelDirError

pytest.importorskip("onnxruntime")



@pytest.fixture(scope="module", params=available_methods())
def exported_run(request, synthetic_dataset, tmp_path_factory):
    """A tiny trained run of each method, exported to RUN/export-onnx by train itself (as by `export`)."""
    method = request.param
    run_dir = tmp_path_factory.mktemp(f"run_{method}") / "run"
    runner = CliRunner()
    args = ["train", "--method", method, str(synthetic_dataset / "train" / "good"), "--out", str(run_dir),
            "--threads", "1", "--workers", "0", "--set", "common.time_budget_min=0", *TRAIN_ARGS[method]]  # fmt: skip
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == EXIT_OK, result.output
    assert f"exported {run_dir / runtimes.DEFAULT_EXPORT_SUBDIR} in " in " ".join(result.output.split())
    return method, run_dir


def _records(runner, images, *args):
    result = runner.invoke(app, ["score", str(images), "--threads", "1", "--workers", "0", "--json", "-q", *args])
    assert result.exit_code in (0, 1), result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _refused(*args: str) -> str:
    """Run the CLI, expect a one-line refusal (exit 2, no traceback); return its output."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == EXIT_USAGE, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
def test_export_folder_holds_graph_calibration_and_contract(exported_run):
    method, run_dir = exported_run
    out = run_dir / runtimes.DEFAULT_EXPORT_SUBDIR
    manifest = json.loads((out / "export.json").read_text())
    calibration = json.loads((run_dir / "calibration.json").read_text())
    assert (out / "model.onnx").stat().st_size > 0
    assert json.loads((out / "calibration.json").read_text())["image_threshold"] == calibration["image_threshold"]
    assert manifest["format_version"] == runtimes.EXPORT_FORMAT_VERSION
    assert manifest["method"] == method
    size = 64 if method == "draem" else 96
    assert manifest["input"]["shape"] == ["batch", 3, size, size]
    assert manifest["input"]["value_range"] == [0.0, 1.0]
    assert manifest["thresholds"]["image_threshold"] == calibration["image_threshold"]
    assert manifest["parity"]["verdicts_identical"] is True
    assert manifest["parity"]["images"] >= 4  # the run's held-out calibration images
    assert manifest["parity"]["max_abs_score_diff"] <= manifest["parity"]["score_tolerance"]


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
def test_onnx_graph_alone_reproduces_the_verdict(exported_run, synthetic_dataset):
    """What the README tells a user of another language: read, resize, run, compare with the threshold."""
    import onnxruntime as ort

    _, run_dir = exported_run
    out = run_dir / runtimes.DEFAULT_EXPORT_SUBDIR
    manifest = json.loads((out / "export.json").read_text())
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    loaded = engine.load(run_dir, device="cpu", threads=1, runtime="torch")
    paths = sorted((synthetic_dataset / "test").rglob("*.png"))[:5]
    from surfaceinspect.data.streaming import iterate_images, stack_images

    items = next(iter(iterate_images(paths, loaded.detector.input_size, len(paths), 0)))
    batch = stack_images(items)
    scores, maps = session.run(["score", "map"], {"image": batch})
    torch_pred = loaded.detector.predict(torch.from_numpy(batch))
    threshold = manifest["thresholds"]["image_threshold"]
    assert maps.shape == tuple(torch_pred.maps.shape)
    assert ((scores >= threshold) == (torch_pred.scores.numpy() >= threshold)).all()
    scale = max(float(np.abs(torch_pred.scores.numpy()).max()), abs(threshold))
    assert np.abs(scores - torch_pred.scores.numpy()).max() <= RTOL * scale


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_score_with_an_exported_runtime_gives_the_same_records(exported_run, synthetic_dataset, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")  # the optional extra
    _, run_dir = exported_run
    runner = CliRunner()
    images = synthetic_dataset / "test"
    manifest = json.loads((run_dir / runtimes.DEFAULT_EXPORT_SUBDIR / "export.json").read_text())
    if runtime != "onnx" and not manifest["parity_other"][runtime]["passed"]:
        # Export found this runtime disagreeing (OpenVINO 2026.4 on CS-Flow: its ONNX Resize with
        # antialias differs from torch's): scoring with it must be refused, not silently different.
        output = _refused("score", str(images), "--model", str(run_dir), "--runtime", runtime, "-q")
        assert f"cannot run with {runtime}" in output
        return
    torch_records = _records(runner, images, "--model", str(run_dir), "--runtime", "torch")
    graph_records = _records(runner, images, "--model", str(run_dir), "--runtime", runtime)
    folder_records = _records(runner, images, "--model", str(run_dir / runtimes.DEFAULT_EXPORT_SUBDIR),
                              "--runtime", runtime)  # fmt: skip
    assert len(torch_records) == len(graph_records) == len(folder_records) > 10
    threshold = engine.load(run_dir, device="cpu").calibration.image_threshold
    for a, b, c in zip(torch_records, graph_records, folder_records, strict=True):
        assert a["path"] == b["path"] == c["path"]
        assert a["verdict"] == b["verdict"] == c["verdict"]
        assert a["n_regions"] == b["n_regions"]
        assert b["score"] == c["score"]
        assert abs(a["score"] - b["score"]) <= RTOL * max(abs(a["score"]), abs(threshold))


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
def test_auto_runtime_prefers_a_current_export_on_the_cpu(exported_run, synthetic_dataset, tmp_path):
    """The default runtime scores with the export on a CPU, and with torch where the export cannot stand in."""
    method, run_dir = exported_run
    assert runtimes.auto_runtime(run_dir, on_cpu=True) == "onnx"
    assert runtimes.auto_runtime(run_dir, on_cpu=False) == "torch"  # a GPU keeps torch
    inference_set = "draem.smoothing_kernel=3" if method == "draem" else "csflow.map_sigma=2"
    assert runtimes.auto_runtime(run_dir, on_cpu=True, inference_sets=[inference_set]) == "torch"
    exported, trained = engine.load(run_dir, device="cpu"), engine.load(run_dir, device="cpu", runtime="torch")
    assert isinstance(exported.detector, runtimes.ExportedDetector) and isinstance(exported.detector, Scorer)
    assert not isinstance(trained.detector, runtimes.ExportedDetector) and isinstance(trained.detector, Scorer)
    assert exported.detector.input_size == trained.detector.input_size and exported.detector.name == method
    result = CliRunner().invoke(app, ["score", str(synthetic_dataset / "test" / "good"), "--model", str(run_dir),
                                      "--threads", "1", "--workers", "0"])  # fmt: skip
    assert result.exit_code in (0, 1), result.output
    assert "[onnx:" in result.output  # the operator sees which runtime scored
    # An export older than the run's weights is not used: torch scores what the run holds now.
    stale = tmp_path / "stale"
    shutil.copytree(run_dir, stale)
    metadata = json.loads((stale / "metadata.json").read_text())
    metadata["weights_sha256"] = "0" * 64
    (stale / "metadata.json").write_text(json.dumps(metadata))
    assert runtimes.auto_runtime(stale, on_cpu=True) == "torch"


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
def test_openvino_refuses_an_export_it_was_not_checked_with(exported_run, synthetic_dataset, tmp_path):
    _, run_dir = exported_run
    copy = tmp_path / "export_copy"
    shutil.copytree(run_dir / runtimes.DEFAULT_EXPORT_SUBDIR, copy)
    manifest = json.loads((copy / "export.json").read_text())
    manifest["parity_other"] = {"openvino": {"passed": False, "reason": "openvino is not installed"}}
    (copy / "export.json").write_text(json.dumps(manifest))
    output = _refused("score", str(synthetic_dataset / "test"), "--model", str(copy), "--runtime", "openvino", "-q")
    assert "cannot run with openvino: openvino is not installed" in output


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
def test_export_that_disagrees_is_refused_and_nothing_written(exported_run, tmp_path):
    import onnx
    from onnx import numpy_helper

    _, run_dir = exported_run

    def tamper(data: bytes) -> bytes:
        """Scores 1% too high: the graph runs, but does not score like the model."""
        model = onnx.load_from_string(data)
        for node in model.graph.node:
            node.output[:] = ["score_raw" if name == "score" else name for name in node.output]
        model.graph.initializer.append(numpy_helper.from_array(np.array(1.01, np.float32), "tamper_factor"))
        model.graph.node.append(onnx.helper.make_node("Mul", ["score_raw", "tamper_factor"], ["score"]))
        return model.SerializeToString()

    loaded = engine.load(run_dir, device="cpu", threads=1, runtime="torch")
    out = tmp_path / "bad_export"
    with pytest.raises(ExportError, match="does not score like the torch model"):
        export_run(loaded.run_dir, loaded.detector, loaded.calibration, loaded.metadata, out, tamper=tamper)
    assert not (out / "model.onnx").exists() and not (out / "export.json").exists()


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
def test_modified_or_other_version_export_is_refused_with_one_line(exported_run, synthetic_dataset, tmp_path):
    _, run_dir = exported_run
    copy = tmp_path / "export_copy"
    shutil.copytree(run_dir / runtimes.DEFAULT_EXPORT_SUBDIR, copy)
    images = str(synthetic_dataset / "test")

    manifest = json.loads((copy / "export.json").read_text())
    manifest["format_version"] = 99
    (copy / "export.json").write_text(json.dumps(manifest))
    output = _refused("score", images, "--model", str(copy), "-q")
    assert "export format 99" in output and "export the model again" in output

    manifest["format_version"] = runtimes.EXPORT_FORMAT_VERSION
    (copy / "export.json").write_text(json.dumps(manifest))
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    assert "does not match the checksum" in _refused("score", images, "--model", str(copy), "-q")


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
def test_runtime_onnx_without_an_export_says_how_to_make_one(exported_run, synthetic_dataset, tmp_path):
    _, run_dir = exported_run
    bare = tmp_path / "run_copy"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns(runtimes.DEFAULT_EXPORT_SUBDIR))
    output = _refused("score", str(synthetic_dataset / "test"), "--model", str(bare), "--runtime", "onnx", "-q")
    assert "surfaceinspect export --model" in output


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
def test_export_refuses_a_foreign_folder(exported_run, tmp_path):
    _, run_dir = exported_run
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "model.onnx").write_bytes(b"someone else's model")
    _refused("export", "--model", str(run_dir), "--out", str(foreign), "-q")
    assert (foreign / "model.onnx").read_bytes() == b"someone else's model"


@pytest.mark.parametrize("method", ["draem", "csflow"])
def test_inference_module_computes_what_predict_returns(method):
    """The module export writes is predict itself (same networks, same post-processing), in float32."""
    import torch
    from test_csflow import make_detector
    from test_draem import tiny_run

    from surfaceinspect.detectors.draem.detector import DraemDetector

    gen = torch.Generator().manual_seed(0)
    if method == "draem":
        detector = DraemDetector(tiny_run([32, 48]), torch.device("cpu"))
        # Freshly initialised DRAEM outputs a flat 0.5; perturbed weights give maps that vary.
        state = detector.state_dict()
        for key, value in state.items():
            if key.endswith(("weight", "bias")):
                value += 0.3 * torch.randn(value.shape, generator=gen)
        detector.load_state_dict(state)
    else:
        detector = make_detector([64, 96])
        detector.init_random_weights()
    images = torch.rand(3, 3, *detector.input_size, generator=gen)
    expected = detector.predict(images)
    with torch.inference_mode():
        scores, maps = detector.inference_module()(images)
    assert maps.shape == expected.maps.shape == (3, *detector.input_size)
    assert expected.maps.std() > 1e-3 * expected.maps.abs().max()  # maps that vary: the comparison can fail
    torch.testing.assert_close(scores, expected.scores, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(maps, expected.maps, rtol=1e-4, atol=0.0)


def test_missing_runtime_packages_name_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ModelDirError, match="pip install onnxruntime"):
        runtimes.import_onnxruntime()
    with pytest.raises(ModelDirError, match=r"pip install -e '\.\[openvino\]'"):
        runtimes.graph_runner(b"", "openvino")


@pytest.mark.slow  # exports a tiny random model in a subprocess (~30 s)
def test_runtime_benchmark_script_reports_every_runtime_against_torch(tmp_path):
    """Smoke test of benchmarks/runtimes.py (tiny model, a fraction of a second per runtime; no timing checked)."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "runtimes.py"
    sets = ["common.image_size=32", "draem.recon_width=4", "draem.disc_width=4", "draem.recon_levels=3",
            "draem.disc_levels=3"]  # fmt: skip
    cmd = [sys.executable, str(script), "--method", "draem", "--threads", "1", "--seconds", "0.05", "--batch", "2",
           "--runtime", "torch", "--runtime", "onnx", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["runtimes"]) == {"torch", "onnx"}
    onnx = report["runtimes"]["onnx"]
    assert onnx["parity_max_rel_diff"] < RTOL
    assert onnx["images_per_s_batch1"] > 0 and onnx["latency_ms_p95"] >= onnx["latency_ms_p50"]
    assert report["runtimes"]["torch"]["vs_torch_batch1"] == 1.0


def test_runtime_benchmark_script_sweeps_every_shipped_profile():
    """`benchmarks/runtimes.py --profile all`: which configurations it measures, and its table (nothing timed)."""
    import importlib.util

    from surfaceinspect.profiles import method_profiles

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "runtimes.py"
    spec = importlib.util.spec_from_file_location("benchmark_runtimes", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = [(m, p) for m in available_methods() for p in sorted(method_profiles(m))]
    assert module.configurations([], ["all"]) == shipped and ("draem", "long") in shipped
    assert module.configurations(["csflow"], ["cpu", "texture"]) == [("csflow", "cpu"), ("csflow", "texture")]
    with pytest.raises(SystemExit, match="no such profile of csflow: long"):
        module.configurations(["csflow"], ["long"])
    report = {"method": "draem", "profile": "cpu", "input_hw": [128, 128], "batched": 8, "export_seconds": 21.04,
              "runtimes": {"torch": {"images_per_s_batch1": 5.0}, "onnx": {"images_per_s_batch1": 10.0,
                                                                          "vs_torch_batch1": 2.0}}}  # fmt: skip
    rows = module.table([report, {"method": "csflow", "profile": "paper", "failed": "MemoryError"}]).splitlines()
    assert rows[2] == "| draem | cpu | 128x128 | 8 | 5.00 | 10.00 | - | - | 2.00 | 21.0 |"
    assert rows[3] == "| csflow | paper | - | - | - | - | - | - | - | MemoryError |"


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
def test_records_csv_identical_columns(exported_run, synthetic_dataset, tmp_path):
    """--output with --runtime onnx writes the same columns (one engine path, one record type)."""
    _, run_dir = exported_run
    runner = CliRunner()
    for runtime in ("torch", "onnx"):
        out = tmp_path / f"{runtime}.csv"
        result = runner.invoke(app, ["score", str(synthetic_dataset / "test"), "--model", str(run_dir),
                                     "--runtime", runtime, "--output", str(out), "-q", "--threads", "1"])  # fmt: skip
        assert result.exit_code in (0, 1), result.output
    with open(tmp_path / "torch.csv") as a, open(tmp_path / "onnx.csv") as b:
        rows_a, rows_b = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert rows_a[0].keys() == rows_b[0].keys()
    assert [r["verdict"] for r in rows_a] == [r["verdict"] for r in rows_b]


@pytest.mark.slow  # trains a tiny model and exports it (~1 min on a loaded CPU)
def test_tiled_run_exports_the_tile_graph_and_scores_alike(synthetic_dataset, tmp_path):
    """Tiling stays outside the graph: the export takes one tile, --runtime onnx tiles like torch."""
    run_dir = tmp_path / "tiled"
    runner = CliRunner()
    args = ["train", "--method", "draem", str(synthetic_dataset / "train" / "good"), "--out", str(run_dir),
            "--threads", "1", "--workers", "0", "--set", "common.time_budget_min=0", "--no-export",
            "--set", "common.tiling.enabled=true", *TRAIN_ARGS["draem"]]  # fmt: skip
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == EXIT_OK
    assert not (run_dir / runtimes.DEFAULT_EXPORT_SUBDIR).exists()
    result = runner.invoke(app, ["export", "--model", str(run_dir), "--threads", "1"], catch_exceptions=False)
    assert result.exit_code == EXIT_OK and "exported" in result.output, result.output
    manifest = json.loads((run_dir / runtimes.DEFAULT_EXPORT_SUBDIR / "export.json").read_text())
    assert manifest["tiling"]["enabled"] is True and manifest["tiling"]["tile"] == [64, 64]
    assert manifest["input"]["shape"] == ["batch", 3, 64, 64]
    images = synthetic_dataset / "test"  # 96 px images: 4 overlapping 64 px tiles each
    torch_records = _records(runner, images, "--model", str(run_dir), "--runtime", "torch")
    onnx_records = _records(runner, images, "--model", str(run_dir), "--runtime", "onnx")
    threshold = engine.load(run_dir, device="cpu").calibration.image_threshold
    for a, b in zip(torch_records, onnx_records, strict=True):
        assert a["verdict"] == b["verdict"] and a["width"] == b["width"] == 96
        assert abs(a["score"] - b["score"]) <= RTOL * max(abs(a["score"]), abs(threshold))


def test_parity_tolerates_float_noise_on_the_threshold_image_only():
    """The quantile threshold is one calibration image's score: rounding may flip that image alone."""
    import torch

    from surfaceinspect.analysis.calibration import calibrate
    from surfaceinspect.deploy.export import compare
    from surfaceinspect.detectors.base import Prediction

    good = np.array([0.2, 0.3, 0.4, 0.5])
    calibration = calibrate("draem", good, good, good * 0.5, false_reject_rate=0.01)
    assert calibration.image_threshold == 0.5  # the highest good score
    maps = torch.zeros(4, 8, 8)
    reference = Prediction(torch.tensor(good, dtype=torch.float32), maps)
    noisy = Prediction(reference.scores - 1e-7, maps)  # the threshold image now scores just below it
    report = compare(reference, noisy, calibration, ["a", "b", "c", "d"])
    assert report.passed and not report.verdicts_differ
    # A flip of an image clear of the threshold is still refused (here with a wrong score as well).
    wrong = Prediction(torch.tensor([0.2, 0.3, 0.6, 0.5]), maps)
    report = compare(reference, wrong, calibration, ["a", "b", "c", "d"])
    assert report.verdicts_differ == ["c"] and not report.passed
