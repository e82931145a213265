"""Model directory: round trip, refusal of tampered/incompatible directories, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from surfaceinspect import engine
from surfaceinspect.detectors import available_methods
from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.errors import ModelDirError
from surfaceinspect.profiles import resolve_run_config
from surfaceinspect.storage import modeldir
from surfaceinspect.storage.atomic import atomic_open, write_json_atomic


@pytest.fixture
def trained_toy(toy_method, synthetic_dataset, tmp_path):
    run = resolve_run_config(method="toy", profile="cpu")
    result = engine.train(synthetic_dataset / "train" / "good", run, run_dir=tmp_path / "run")
    return result.run_dir


def test_round_trip_gives_identical_scores(trained_toy, synthetic_dataset):
    files = sorted((synthetic_dataset / "test").rglob("*.png"))[:6]
    a = engine.load(trained_toy)
    b = engine.load(trained_toy)
    ra = [
        r.record.score
        for r in engine.run_inference(files, synthetic_dataset, a.detector, a.calibration, batch_size=4, workers=0)
    ]
    rb = [
        r.record.score
        for r in engine.run_inference(files, synthetic_dataset, b.detector, b.calibration, batch_size=4, workers=0)
    ]
    assert ra == rb
    meta = json.loads((trained_toy / "metadata.json").read_text())
    assert meta["method"] == "toy" and meta["format_version"] == modeldir.FORMAT_VERSION
    assert meta["config"]["common"]["image_size"] == 64
    assert meta["dataset"]["n_files"] == 30 and meta["versions"]["torch"] == torch.__version__
    assert not (trained_toy / "checkpoint.pt").exists(), "checkpoint must be removed after a finished run"


def test_latest_marker_points_at_finished_run(trained_toy, isolated_runs, toy_method, synthetic_dataset):
    run = resolve_run_config(method="toy", profile="cpu")
    result = engine.train(synthetic_dataset / "train" / "good", run, mark_latest=True)
    assert result.run_dir.parent == isolated_runs
    assert modeldir.latest_run() == result.run_dir
    assert modeldir.resolve_model_dir(None) == result.run_dir


def test_tampered_weights_are_refused(trained_toy):
    weights = trained_toy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="does not match the checksum"):
        engine.load(trained_toy)


def test_incompatible_format_and_missing_files_are_refused(trained_toy):
    meta_path = trained_toy / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="model format 99"):
        engine.load(trained_toy)
    meta_path.unlink()
    with pytest.raises(ModelDirError, match="not a finished model directory"):
        engine.load(trained_toy)
    with pytest.raises(ModelDirError, match="does not exist"):
        engine.load(trained_toy / "nope")


def test_unknown_method_in_metadata_is_refused(trained_toy):
    meta_path = trained_toy / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["method"] = "evil"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="invalid config"):
        engine.load(trained_toy)


def test_no_model_yet_says_how_to_train():
    with pytest.raises(ModelDirError, match="surfaceinspect train --method draem"):
        modeldir.resolve_model_dir(None)


def test_checkpoint_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format_version": modeldir.FORMAT_VERSION, "x": Evil()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ModelDirError, match="cannot be loaded safely"):
        modeldir.load_checkpoint(tmp_path)


def test_checkpoint_keeps_training_time_and_context_counts_it(tmp_path):
    state = {"step": 3, "w": torch.ones(2)}
    checkpoint = modeldir.TrainCheckpoint({"method": "toy"}, "/data", ["a.png"], [], state, train_seconds=12.5)
    modeldir.save_checkpoint(tmp_path, checkpoint)
    loaded = modeldir.load_checkpoint(tmp_path)
    assert loaded.train_seconds == 12.5 and loaded.detector_state["step"] == 3
    # A resumed run's context starts from the time already spent, so its budget covers both parts.
    context = TrainContext(time_budget_s=60.0, elapsed_before_s=loaded.train_seconds)
    assert 12.5 <= context.elapsed_s() < 13.5


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(target, "w") as handle:
        handle.write('{"v": 2, "partial')
        raise RuntimeError("simulated crash")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_write_survives_hard_kill(tmp_path):
    """A process killed (os._exit) mid-write leaves the previous file intact and complete."""
    target = tmp_path / "calibration.json"
    write_json_atomic(target, {"v": 1})
    code = textwrap.dedent(f"""
        import os
        from surfaceinspect.storage.atomic import atomic_open
        with atomic_open({str(target)!r}, "w") as h:
            h.write('{{"v": 2, "half')
            h.flush()
            os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    assert proc.returncode == 9
    assert json.loads(target.read_text()) == {"v": 1}


def test_atomic_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("method", available_methods())
def test_saved_model_scores_like_the_model_in_memory(method, tmp_path):
    """save_model -> load_model reproduces the trained detector itself (config rebuilt from metadata.json)."""
    from surfaceinspect.config import build_run_config
    from surfaceinspect.detectors import get_detector_class

    cls = get_detector_class(method)
    tiny = {
        "draem": {
            "steps": 3,
            "recon_width": 8,
            "disc_width": 4,
            "recon_levels": 3,
            "disc_levels": 3,
            "smoothing_kernel": 5,
        },
        "csflow": {"epochs": 1, "hidden_channels": 16, "feature_norm": "channel"},
    }[method]
    common = {"image_size": 64 if method == "draem" else 128, "batch_size": 4, "workers": 0, "device": "cpu"}
    run = build_run_config(cls.config_cls, "cpu", [{"common": common, method: tiny}])
    gen = torch.Generator().manual_seed(0)
    size = run.common.image_size
    trained = cls(run, torch.device("cpu"))
    summary = trained.fit((torch.rand(6, 3, size, size, generator=gen) * 255).to(torch.uint8), TrainContext())
    probe = torch.rand(3, 3, size, size, generator=gen)
    before = trained.predict(probe)

    modeldir.save_model(tmp_path, trained, summary.to_dict(), {"root": "", "n_files": 6})
    loaded, metadata = modeldir.load_model(tmp_path, torch.device("cpu"))
    after = loaded.predict(probe)
    assert loaded.run_config.to_dict() == run.to_dict() and metadata["method"] == method
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)
