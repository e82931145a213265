"""`train` ends with the ONNX export (issue #31): written and used, skipped, refused, replaced, resumed (toy model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surfaceinspect.cli import app
from surfaceinspect.deploy import export, runtimes
from surfaceinspect.errors import EXIT_INTERRUPTED, EXIT_OK
from surfaceinspect.storage import modeldir

pytest.importorskip("onnxruntime")


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def text(result) -> str:
    """The output with the console's line wrapping undone."""
    return " ".join(result.output.split())


def records(images: Path, model: Path) -> list[dict]:
    result = run("score", images, "--model", model, "--json", "-q", "--threads", "1", "--workers", "0")
    assert result.exit_code in (0, 1), result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_train_exports_and_score_uses_it_until_force_replaces_the_model(toy_method, synthetic_dataset, tmp_path):
    run_dir, good, test = tmp_path / "run", synthetic_dataset / "train" / "good", synthetic_dataset / "test"
    result = run("train", "-m", "toy", good, "--out", run_dir, "--threads", "1")
    assert result.exit_code == EXIT_OK, result.output
    export_dir = run_dir / runtimes.DEFAULT_EXPORT_SUBDIR
    assert f"exported {export_dir} in " in text(result)  # its cost, in seconds
    manifest = json.loads((export_dir / "export.json").read_text())
    assert manifest["parity"]["verdicts_identical"]
    assert manifest["source_weights_sha256"] == modeldir.read_metadata(run_dir)["weights_sha256"]
    # the manifest covers the export, and the model id printed is the one the records carry
    identity = modeldir.verify_sums(run_dir, expected=True)
    assert identity.sealed and "export-onnx/model.onnx" in identity.sums
    assert f"(model id {identity.model_id})" in text(result)
    rows = records(test, run_dir)
    assert rows and {r["runtime"] for r in rows} == {"onnx"} and {r["model_id"] for r in rows} == {identity.model_id}
    heatmap = run("heatmap", test, "--model", run_dir, "--out", tmp_path / "heat", "-q", "--threads", "1")
    assert heatmap.exit_code in (0, 1), heatmap.output

    # --force replaces the model and its export: none of the old graph stays behind, sealed in the new manifest
    result = run("train", "-m", "toy", good, "--out", run_dir, "--force", "--no-export", "--seed", "5", "-q")
    assert result.exit_code == EXIT_OK, result.output
    assert "export-onnx/model.onnx" in text(result)  # named among the removed files
    assert not (export_dir / "export.json").exists() and not (export_dir / "model.onnx").exists()
    assert "export-onnx/model.onnx" not in modeldir.verify_sums(run_dir, expected=True).sums
    assert {r["runtime"] for r in records(test, run_dir)} == {"torch"}


def test_no_export_writes_none(toy_method, synthetic_dataset, tmp_path):
    result = run("train", "-m", "toy", synthetic_dataset / "train" / "good", "--out", tmp_path / "run", "--no-export")
    assert result.exit_code == EXIT_OK, result.output
    assert not (tmp_path / "run" / runtimes.DEFAULT_EXPORT_SUBDIR).exists()
    assert "exporting" not in result.output and "exported" not in result.output


@pytest.mark.parametrize("failure", ["parity", "exporter"])
def test_refused_export_leaves_a_usable_torch_model_a_warning_and_exit_0(
    toy_method, synthetic_dataset, tmp_path, monkeypatch, failure
):
    real_compare = export.compare
    if failure == "parity":  # the graph does not score like the model

        def compare(*args, **kwargs):
            report = real_compare(*args, **kwargs)
            report.max_score_diff = report.score_tolerance * 2
            return report

        monkeypatch.setattr(export, "compare", compare)
    else:  # the exporter fails in a way it has no message for

        def onnx_bytes(*_args, **_kwargs):
            raise RuntimeError("unsupported operator aten::toy")

        monkeypatch.setattr(export, "onnx_bytes", onnx_bytes)
    run_dir = tmp_path / "run"
    result = run("train", "-m", "toy", synthetic_dataset / "train" / "good", "--out", run_dir, "-q")
    assert result.exit_code == EXIT_OK, result.output
    output = text(result)
    assert output.count("warning: no ONNX export") == 1 and "Traceback" not in output
    why = "does not score like the torch model" if failure == "parity" else "RuntimeError: unsupported operator"
    assert why in output and f"Retry with: surfaceinspect export --model {run_dir}" in output
    assert not (run_dir / runtimes.DEFAULT_EXPORT_SUBDIR / "export.json").exists()
    rows = records(synthetic_dataset / "test", run_dir)
    assert rows and {r["runtime"] for r in rows} == {"torch"}
    assert {r["model_id"] for r in rows} == {modeldir.verify_sums(run_dir, expected=True).model_id}
    if failure == "parity":  # the retry the warning names works once the cause is gone
        monkeypatch.setattr(export, "compare", real_compare)
        retried = run("export", "--model", run_dir, "--threads", "1", "-q")
        assert retried.exit_code == EXIT_OK, retried.output
        assert {r["runtime"] for r in records(synthetic_dataset / "test", run_dir)} == {"onnx"}


def test_resumed_training_ends_with_the_export(toy_method, synthetic_dataset, tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--set", "toy.fail_at_step=10", "--set", "common.checkpoint_every_s=0.0001", "-q"]
    result = CliRunner().invoke(app, ["train", "-m", "toy", str(synthetic_dataset / "train" / "good"),
                                      "--out", str(run_dir), *flags])  # fmt: skip
    assert result.exit_code == EXIT_INTERRUPTED and not (run_dir / runtimes.DEFAULT_EXPORT_SUBDIR).exists()
    result = run("train", "--resume", run_dir, "-q")
    assert result.exit_code == EXIT_OK, result.output
    assert (run_dir / runtimes.DEFAULT_EXPORT_SUBDIR / "export.json").is_file()
    assert modeldir.verify_sums(run_dir, expected=True).sealed
    assert runtimes.auto_runtime(run_dir, on_cpu=True) == "onnx"
