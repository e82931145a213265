"""The contract every method keeps, checked for each registered method and for the toy plug-in.

fit -> predict shapes -> save/load round trip -> export parity (where the method exports) ->
resume after a checkpoint equals the uninterrupted training. A new method passes this file
without editing it: register it (``detectors/__init__.py``, or ``$SURFACEINSPECT_METHODS``) and
ship a ``cpu`` profile; its smallest settings for this test may be added to ``TINY``.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from typer.testing import CliRunner

from surfaceinspect.cli import app
from surfaceinspect.config import build_run_config
from surfaceinspect.deploy import export
from surfaceinspect.detectors import TrainContext, TrainingPaused, available_methods, get_detector_class
from surfaceinspect.errors import EXIT_OK
from surfaceinspect.storage import modeldir

# The smallest settings of each method that still train a few steps (image side, method section).
TINY: dict[str, tuple[int, dict]] = {
    "draem": (64, {"steps": 4, "recon_width": 8, "disc_width": 4, "recon_levels": 3, "disc_levels": 3}),
    "csflow": (128, {"epochs": 2, "hidden_channels": 16, "feature_norm": "channel"}),
    "toy": (64, {"epochs": 1}),
}
N_IMAGES = 8


def _detector(method: str):
    size, section = TINY.get(method, (64, {}))
    cls = get_detector_class(method)
    common = {"image_size": size, "batch_size": 4, "workers": 0, "device": "cpu", "time_budget_min": 0}
    return cls(build_run_config(cls.config_cls, "cpu", [{"common": common, method: section}]), torch.device("cpu"))


def _images(detector, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, *detector.input_size, generator=gen) * 255).to(torch.uint8)


def _checkpointed(saved: list[dict]):
    def on_checkpoint(state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)  # checkpoints must load with weights_only=True
        buffer.seek(0)
        saved.append(torch.load(buffer, weights_only=True))

    return on_checkpoint


@pytest.fixture(params=[*available_methods(), "toy"])
def method(request, toy_method):
    return request.param


def test_method_keeps_the_detector_contract(method, tmp_path):
    detector = _detector(method)
    images = _images(detector, N_IMAGES, seed=0)
    summary = detector.fit(images, TrainContext())
    assert 0 < summary.steps <= summary.planned_steps

    probe = _images(detector, 3, seed=1).float() / 255
    prediction = detector.predict(probe)
    assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, *detector.input_size)
    assert prediction.scores.dtype == prediction.maps.dtype == torch.float32
    assert torch.isfinite(prediction.scores).all() and torch.isfinite(prediction.maps).all()

    modeldir.save_model(tmp_path / "model", detector, summary.to_dict(), {"root": "", "n_files": N_IMAGES})
    loaded, metadata = modeldir.load_model(tmp_path / "model", torch.device("cpu"))
    again = loaded.predict(probe)
    assert metadata["method"] == method and loaded.run_config.to_dict() == detector.run_config.to_dict()
    assert torch.equal(again.scores, prediction.scores) and torch.equal(again.maps, prediction.maps)

    try:
        module = detector.inference_module()
    except NotImplementedError:
        module = None  # a method that does not export: nothing more to keep
    if module is not None:
        with torch.inference_mode():
            scores, maps = module(probe)
        torch.testing.assert_close(scores, prediction.scores, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(maps, prediction.maps, rtol=1e-4, atol=1e-6)
        pytest.importorskip("onnxruntime")
        graph = export.run_graph(export.onnx_bytes(module, probe), "onnx", probe)
        torch.testing.assert_close(graph.scores.float(), prediction.scores, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(graph.maps.float(), prediction.maps, rtol=1e-3, atol=1e-5)


def test_method_resumes_a_checkpoint_as_if_never_stopped(method):
    uninterrupted = _detector(method)
    images = _images(uninterrupted, N_IMAGES, seed=0)
    summary = uninterrupted.fit(images, TrainContext())
    assert summary.steps >= 2

    saved: list[dict] = []
    paused = _detector(method)
    with pytest.raises(TrainingPaused):
        paused.fit(images, TrainContext(on_checkpoint=_checkpointed(saved), pause_at_step=summary.steps // 2))
    resumed = _detector(method)
    resumed_summary = resumed.fit(images, TrainContext(resume_state=saved[-1]))
    assert resumed_summary.steps == summary.steps
    expected, got = uninterrupted.state_dict(), resumed.state_dict()
    assert set(expected) == set(got)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)


def test_a_plugin_method_shows_up_everywhere_without_editing_a_file(toy_method, synthetic_dataset, tmp_path):
    """The toy is registered from the tests only ($SURFACEINSPECT_METHODS, $SURFACEINSPECT_PROFILES)."""
    runner = CliRunner()
    env = {"COLUMNS": "2000"}  # no wrapped help lines
    train_help = runner.invoke(app, ["train", "--help"], env=env)
    assert train_help.exit_code == EXIT_OK and "auto, csflow, draem, toy" in train_help.output
    benchmark_help = runner.invoke(app, ["benchmark", "--help"], env=env)
    assert benchmark_help.exit_code == EXIT_OK and "csflow, draem, toy" in benchmark_help.output
    listed = runner.invoke(app, ["profiles"], env=env)
    assert listed.exit_code == EXIT_OK
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in listed.output.splitlines() if "│" in line]
    assert ["toy", "cpu", "tests: a per-pixel mean, trained in seconds", "toy-cpu.yaml"] in rows
    out = tmp_path / "bench"
    result = runner.invoke(
        app, ["benchmark", str(synthetic_dataset), "--method", "toy", "--quick", "--out", str(out), "--device", "cpu",
              "-q"],
    )  # fmt: skip
    assert result.exit_code == EXIT_OK, result.output
    entries = json.loads((out / "report.json").read_text())["entries"]
    assert [e["method"] for e in entries] == ["toy"] and not entries[0].get("error")
