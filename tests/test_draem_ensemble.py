"""DRAEM ensembles (draem.members): training, scoring, resume, persistence (generated data only)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_draem import assert_same_weights, load_checkpoints, random_uint8, recording_checkpoints, tiny_run

from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.detectors.draem import DraemDetector
from surfaceinspect.detectors.draem.networks import DraemEnsemble
from surfaceinspect.errors import ConfigError, ModelDirError

CPU = torch.device("cpu")


def _trained(steps: int = 3, members: int = 1, seed: int = 3, **draem: object) -> DraemDetector:
    run = tiny_run(32, steps=steps, members=members, **draem)
    run.common.seed = seed
    det = DraemDetector(run, CPU)
    det.fit(random_uint8(6, 32), TrainContext())
    return det


def test_each_model_of_an_ensemble_is_the_plain_run_of_its_seed() -> None:
    ensemble = _trained(members=2, seed=3)
    assert isinstance(ensemble.model, DraemEnsemble) and len(ensemble.model.members) == 2
    for index, seed in enumerate((3, 4)):
        plain = _trained(seed=seed).model.state_dict()
        member = ensemble.model.members[index].state_dict()
        for key in plain:
            torch.testing.assert_close(member[key], plain[key], atol=1e-6, rtol=0, msg=key)


def test_ensemble_scores_the_mean_anomaly_probability_of_its_models() -> None:
    det = _trained(members=3)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        probs = [F.softmax(m(images)[1], dim=1)[:, 1:] for m in det.model.members]
    mean = torch.stack(probs).mean(0)
    expected = F.avg_pool2d(mean, 5, stride=1, padding=2, count_include_pad=False)[:, 0]
    pred = det.predict(images)
    torch.testing.assert_close(pred.maps, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pred.scores, expected.flatten(1).amax(1), atol=1e-5, rtol=1e-4)
    # The exported module computes the same.
    with torch.no_grad():
        scores, maps = det.inference_module()(images)
    torch.testing.assert_close(maps, pred.maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores, pred.scores, atol=1e-5, rtol=1e-4)


def test_interrupted_ensemble_resumes_in_the_model_it_was_training() -> None:
    images = random_uint8(6, 32)
    on_checkpoint, saved = recording_checkpoints()
    full = DraemDetector(tiny_run(32, steps=3, members=2), CPU)
    summary = full.fit(images, TrainContext(on_checkpoint=on_checkpoint, checkpoint_every_s=0.0))
    assert summary.steps == 6 and summary.planned_steps == 6
    assert [m["steps"] for m in summary.details["members"]] == [3, 3]
    (second_model_step_1,) = [s for s in load_checkpoints(saved) if s["member"] == 1 and s["step"] == 1]
    assert second_model_step_1["members_done"] == [3]

    resumed = DraemDetector(tiny_run(32, steps=3, members=2), CPU)
    summary2 = resumed.fit(images, TrainContext(resume_state=second_model_step_1))
    assert summary2.steps == 6 and summary2.resumed_from_step == 1
    assert_same_weights(full, resumed)


def test_time_budget_is_shared_among_the_models() -> None:
    det = DraemDetector(tiny_run(32, steps=100_000, members=2), CPU)
    summary = det.fit(random_uint8(8, 32), TrainContext(time_budget_s=4.0))
    steps = [m["steps"] for m in summary.details["members"]]
    assert all(0 < s < 100_000 for s in steps)  # both trained, both shortened
    assert "model 2:" in summary.schedule_note and "to fit the time budget" in summary.schedule_note


def test_ensemble_weights_load_only_into_an_ensemble_of_the_same_size() -> None:
    det = _trained(members=2)
    again = DraemDetector(tiny_run(32, members=2), CPU)
    again.load_state_dict(det.state_dict())
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(again.predict(images).maps, det.predict(images).maps)
    with pytest.raises(ModelDirError, match="do not fit"):
        DraemDetector(tiny_run(32), CPU).load_state_dict(det.state_dict())


def test_members_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="members=0"):
        tiny_run(32, members=0)
    with pytest.raises(ConfigError, match="members=17"):
        tiny_run(32, members=17)


def test_data_parallel_training_refuses_an_ensemble() -> None:
    from surfaceinspect.detectors.draem.distributed import DistributedDraem

    with pytest.raises(ConfigError, match="members=2"):
        DistributedDraem(tiny_run(32, members=2), CPU)


def test_ensemble_trains_scores_and_exports_through_the_cli(synthetic_dataset, tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from surfaceinspect.cli import app
    from surfaceinspect.errors import EXIT_OK

    monkeypatch.setenv("SURFACEINSPECT_HOME", str(tmp_path / "home"))
    run_dir, runner = tmp_path / "run", CliRunner()
    tiny = ["draem.steps=4", "draem.recon_width=8", "draem.disc_width=4", "draem.recon_levels=3",
            "draem.disc_levels=3", "draem.members=2", "common.time_budget_min=0"]  # fmt: skip
    args = ["train", "--no-export", "-m", "draem", str(synthetic_dataset / "train" / "good"), "--out", str(run_dir),
            "--image-size", "64", "--threads", "1", "--workers", "0"]  # fmt: skip
    result = runner.invoke(app, [*args, *(a for item in tiny for a in ("--set", item))], catch_exceptions=False)
    assert result.exit_code == EXIT_OK, result.output
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["training"]["steps"] == 8 and len(meta["training"]["members"]) == 2
    scored = runner.invoke(app, ["score", str(synthetic_dataset / "test"), "--model", str(run_dir), "--json", "-q",
                                 "--threads", "1", "--workers", "0", "--runtime", "torch"])  # fmt: skip
    assert scored.exit_code in (0, 1), scored.output
    assert len([line for line in scored.stdout.splitlines() if line.strip()]) > 0
    exported = runner.invoke(app, ["export", "--model", str(run_dir), "--threads", "1"], catch_exceptions=False)
    assert exported.exit_code == EXIT_OK and "exported" in exported.output, exported.output
