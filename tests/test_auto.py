"""``--method auto``: pausing a training, selection logic, the whole run with toy candidates, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from surfaceinspect import engine
from surfaceinspect.detectors.base import TrainContext, TrainingPaused, TrainProgress
from surfaceinspect.errors import ConfigError
from surfaceinspect.profiles import resolve_run_config
from surfaceinspect.storage import modeldir
from surfaceinspect.ui import Reporter
from surfaceinspect.workflows import auto

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def toy_profiles(toy_method):
    """toy-cpu (a 16x16 map) and toy-blind (scores every image alike: known to be the worst); their folder."""
    from surfaceinspect.config import PROFILES_ENV

    folder = Path(os.environ[PROFILES_ENV])  # the toy profiles' folder
    (folder / "toy-blind.yaml").write_text(
        "method: toy\ncommon:\n  image_size: 64\n  batch_size: 4\n  workers: 0\n"
        "  calibration:\n    min_images: 4\n    fraction: 0.2\ntoy:\n  epochs: 2\n  blind: true\n"
    )
    return folder


def _good_images(folder: Path, n: int = 30, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    """Smooth, slightly noisy good images: small synthetic anomalies stand out against them."""
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    h, w = size
    ramp = np.linspace(80, 160, w, dtype=np.float32)[None, :].repeat(h, 0)
    for i in range(n):
        img = ramp + rng.normal(0, 3, size=(h, w)).astype(np.float32)
        cv2.imwrite(str(folder / f"good_{i:03d}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return folder


def _request(*sets: str) -> auto.AutoRequest:
    # 3 synthetic anomalies from each of the toy data's 6 held-out good images keep the tests fast.
    return auto.AutoRequest({}, ["common.time_budget_min=0", "auto.synthetic_anomalies=18", *sets])


# ---------------------------------------------------------------------------------------------
# The pause that probes rely on


def test_context_pauses_at_step_with_a_checkpoint():
    saved = []
    context = TrainContext(on_checkpoint=saved.append, pause_at_step=3)
    context.report(TrainProgress("features", 5, 10, optimiser_steps=False), lambda: {"step": 0})
    context.report(TrainProgress("train", 2, 10), lambda: {"step": 2})
    with pytest.raises(TrainingPaused) as paused:
        context.report(TrainProgress("train", 3, 10), lambda: {"step": 3})
    assert (paused.value.step, paused.value.total) == (3, 10)
    assert saved == [{"step": 3}]


def test_context_pauses_at_the_end_of_a_schedule_shorter_than_the_probe():
    context = TrainContext(on_checkpoint=lambda s: None, pause_at_step=300)
    with pytest.raises(TrainingPaused):
        context.report(TrainProgress("train", 40, 40), lambda: {"step": 40})


def test_probe_then_resume_equals_an_uninterrupted_run(toy_method, tmp_path):
    data = _good_images(tmp_path / "good")
    reporter = Reporter(quiet=True)

    def plan(run_dir: Path) -> engine.TrainingPlan:
        config = resolve_run_config(method="toy", profile="cpu")
        return engine.plan_training(data, config, reporter=reporter, run_dir=run_dir)

    whole = engine.fit_plan(plan(tmp_path / "whole"), reporter=reporter)
    probe = engine.fit_plan(plan(tmp_path / "probe"), reporter=reporter, pause_at_step=7)
    assert probe.summary is None and probe.paused_at == 7 and probe.planned_steps == whole.summary["steps"]
    resumed = engine.fit_plan(engine.plan_resume(tmp_path / "probe", reporter=reporter), reporter=reporter)
    assert torch.equal(resumed.detector.mean, whole.detector.mean)
    assert torch.equal(resumed.detector.std, whole.detector.std)


# ---------------------------------------------------------------------------------------------
# Selection logic


def _row(name: str, synthetic: float | None, real: float | None = None) -> dict:
    return {"name": name, "auroc_synthetic": synthetic, "auroc_real": real}


def test_select_winner_takes_the_highest_synthetic_auroc():
    name, reason = auto.select_winner([_row("a", 0.80), _row("b", 0.93), _row("c", 0.91)])
    assert name == "b"
    assert "0.93" in reason and "c 0.91" in reason


def test_select_winner_real_defects_outrank_synthetic_evidence():
    name, reason = auto.select_winner([_row("a", 0.99, real=0.70), _row("b", 0.80, real=0.95)])
    assert name == "b" and "real defects" in reason


def test_select_winner_tie_goes_to_the_cheaper_first_candidate():
    assert auto.select_winner([_row("cheap", 0.9), _row("dear", 0.9)])[0] == "cheap"


def test_select_winner_skips_a_candidate_without_a_figure():
    assert auto.select_winner([_row("broken", None), _row("ok", 0.6)])[0] == "ok"


def test_candidates_far_from_square_get_aspect_keeping_variants(tmp_path):
    square = _good_images(tmp_path / "square", n=3)
    strips = _good_images(tmp_path / "strips", n=3, size=(40, 200))
    names = [c.name for c in auto.plan_candidates(list(square.iterdir()), auto.AutoSettings())]
    assert names == [c.name for c in auto.BASE_CANDIDATES]
    keep = {c.name: c for c in auto.plan_candidates(list(strips.iterdir()), auto.AutoSettings())}
    assert {"csflow-cpu-keep", "draem-cpu-keep"} <= set(keep)
    assert keep["csflow-cpu-keep"].sets == ("common.image_size=keep:572",)  # 256 * sqrt(5)


def test_auto_candidates_name_any_method_and_profile(toy_profiles):
    settings = auto.AutoSettings(candidates=["toy-cpu", "toy-blind"])
    assert [(c.method, c.profile) for c in auto.plan_candidates([], settings)] == [("toy", "cpu"), ("toy", "blind")]
    with pytest.raises(ConfigError, match="no profile 'nosuch' for method toy"):
        auto.plan_candidates([], auto.AutoSettings(candidates=["toy-nosuch"]))
    with pytest.raises(ConfigError, match="METHOD-PROFILE"):
        auto.plan_candidates([], auto.AutoSettings(candidates=["nomethod"]))


def test_auto_settings_are_checked():
    with pytest.raises(ConfigError, match=r"auto\.probe_steps"):
        auto.split_sets(["auto.probe_steps=0"])
    with pytest.raises(ConfigError, match=r"unknown setting auto\.nosuch"):
        auto.split_sets(["auto.nosuch=1"])


# ---------------------------------------------------------------------------------------------
# The whole run


def test_auto_picks_the_detector_that_sees_the_anomalies(toy_profiles, tmp_path):
    data = _good_images(tmp_path / "good")
    result = auto.train_auto(
        data,
        _request("auto.candidates=[toy-blind, toy-cpu]", "auto.probe_steps=10"),
        reporter=Reporter(quiet=True),
        run_dir=tmp_path / "run",
    )
    selection = result.selection
    rows = {r["name"]: r for r in selection["candidates"]}
    assert selection["chosen"] == "toy-cpu" and rows["toy-cpu"]["chosen"] and not rows["toy-blind"]["chosen"]
    assert rows["toy-cpu"]["auroc_synthetic"] > rows["toy-blind"]["auroc_synthetic"]
    assert rows["toy-cpu"]["steps"] == 10 and rows["toy-cpu"]["planned_steps"] == 48
    assert [p["false_reject_target"] for p in selection["operating_points"]] == ["calibrated", "0.01", "0.02", "0.05"]
    # The finished model: the winner trained to the end of its schedule, the table in its metadata.
    run_dir = tmp_path / "run"
    metadata = modeldir.read_metadata(run_dir)
    assert metadata["method"] == "toy" and metadata["training"]["steps"] == 48
    assert metadata["selection"] == json.loads(json.dumps(selection))
    assert not (run_dir / auto.AUTO_STATE_FILE).exists() and not (run_dir / auto.CANDIDATES_DIR).exists()
    raw = json.loads((run_dir / auto.SELECTION_SCORES_FILE).read_text())
    assert raw["winner"] == "toy-cpu" and len(raw["results"]["toy-cpu"]["synthetic_scores"]) == 18
    loaded = engine.load(run_dir)
    assert loaded.calibration.image_threshold > 0
    # The gallery's header says why this detector (heatmap shows it like the table in metadata.json).
    engine.heatmap_folder(loaded, data, tmp_path / "gallery", reporter=Reporter(quiet=True))
    page = (tmp_path / "gallery" / "index.html").read_text()
    assert "chosen by" in page and "--method auto: toy-cpu (highest AUROC on synthetic anomalies" in page


def test_real_defects_folder_outranks_the_synthetic_evidence(toy_profiles, tmp_path):
    import cv2

    data = _good_images(tmp_path / "good")
    defects = tmp_path / "defects"
    defects.mkdir()
    for i in range(4):  # a global brightness shift: only a whole-image statistic notices it
        img = cv2.imread(str(data / f"good_{i:03d}.png"), cv2.IMREAD_GRAYSCALE).astype(np.int16) + 40
        cv2.imwrite(str(defects / f"d{i}.png"), np.clip(img, 0, 255).astype(np.uint8))
    result = auto.train_auto(
        data,
        _request("auto.candidates=[toy-blind, toy-cpu]", "auto.probe_steps=10"),
        reporter=Reporter(quiet=True),
        run_dir=tmp_path / "run",
        defects_dir=defects,
    )
    rows = {r["name"]: r for r in result.selection["candidates"]}
    assert rows["toy-cpu"]["auroc_real"] is not None and "real defects" in result.selection["reason"]
    assert all("catch_real" in p for p in result.selection["operating_points"])


def test_synthetic_evidence_is_deterministic_per_seed(toy_profiles, tmp_path):
    data = _good_images(tmp_path / "good")
    runs = []
    for name in ("a", "b"):
        result = auto.train_auto(
            data,
            _request("auto.candidates=[toy-blind, toy-cpu]", "auto.probe_steps=5"),
            reporter=Reporter(quiet=True),
            run_dir=tmp_path / name,
        )
        runs.append([(r["name"], r["auroc_synthetic"]) for r in result.selection["candidates"]])
    assert runs[0] == runs[1]


def test_auto_resumes_after_kill_9(toy_profiles, tmp_path):
    data = _good_images(tmp_path / "good")
    run_dir = tmp_path / "run"
    env = {**os.environ, "TOY_PROFILES": str(toy_profiles), "SURFACEINSPECT_HOME": str(tmp_path / "home")}
    command = [
        sys.executable, str(TESTS / "cli_with_toy.py"), "train", str(data), "--out", str(run_dir), "-q",
        "--set", "auto.candidates=[toy-blind, toy-cpu]", "--set", "auto.probe_steps=10",
        "--set", "auto.synthetic_anomalies=18", "--set", "toy.step_delay_s=0.05",
        "--set", "common.checkpoint_every_s=0.01", "--time-budget", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state_file = run_dir / auto.AUTO_STATE_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once the first candidate is scored and the second is training
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if len(state.get("results", {})) == 1 and (run_dir / "candidates" / "toy-cpu" / "checkpoint.pt").is_file():
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / modeldir.METADATA_FILE).exists()
    resume = [*command[:2], "train", "--resume", str(run_dir), "--no-export", "-q"]
    resumed = subprocess.run(resume, env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    selection = modeldir.read_metadata(run_dir)["selection"]
    assert selection["chosen"] == "toy-cpu"
    uninterrupted = auto.train_auto(
        data,
        _request("auto.candidates=[toy-blind, toy-cpu]", "auto.probe_steps=10"),
        reporter=Reporter(quiet=True),
        run_dir=tmp_path / "whole",
    )
    expected = [(r["name"], r["auroc_synthetic"]) for r in uninterrupted.selection["candidates"]]
    assert [(r["name"], r["auroc_synthetic"]) for r in selection["candidates"]] == expected


# ---------------------------------------------------------------------------------------------
# The command line


def test_train_without_method_is_auto_and_prints_the_table(toy_profiles, tmp_path):
    from typer.testing import CliRunner

    from surfaceinspect.cli import app

    data = _good_images(tmp_path / "good")
    sets = [
        "--set",
        "auto.candidates=[toy-blind, toy-cpu]",
        "--set",
        "auto.probe_steps=5",
        "--set",
        "auto.synthetic_anomalies=18",
        "--time-budget",
        "0",
    ]
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "run"), *sets])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Candidates (chosen: toy-cpu" in text and "Operating points" in text
    assert modeldir.read_metadata(tmp_path / "run")["selection"]["chosen"] == "toy-cpu"
    # the winner is exported like a single-method run, and the model id printed is the one after the export
    assert (tmp_path / "run" / "export-onnx" / "export.json").is_file()
    assert f"(model id {modeldir.verify_sums(tmp_path / 'run', expected=True).model_id})" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "cpu"], "--profile configure one method"),
        (["--epochs", "3"], "--epochs configure one method"),
        (["--method", "draem", "--defects", "x"], "--defects ranks the candidates of --method auto"),
        (["--set", "auto.probe_steps=0"], "auto.probe_steps=0: use at least 1"),
    ],
)
def test_train_auto_refuses_what_cannot_apply(tmp_path, args, message):
    from typer.testing import CliRunner

    from surfaceinspect.cli import app

    data = _good_images(tmp_path / "good", n=3)
    result = CliRunner().invoke(app, ["train", str(data), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_print_config_of_auto_lists_every_candidate(tmp_path):
    from typer.testing import CliRunner

    from surfaceinspect.cli import app

    result = CliRunner().invoke(app, ["train", "--print-config", "--set", "common.seed=4"])
    assert result.exit_code == 0, result.output
    for candidate in auto.BASE_CANDIDATES:
        assert f"# candidate {candidate.name}" in result.output
    assert result.output.count("seed: 4") == len(auto.BASE_CANDIDATES)
