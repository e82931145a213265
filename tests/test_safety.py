"""Operator safety (issue #10): no command destroys data or quietly produces a detector that passes defects.

One test (or a small group for item 8) per numbered item of the issue, through the CLI with the toy
detector wherever the bug was at CLI level.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import types
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from surfaceinspect import cli, engine
from surfaceinspect.analysis.rendering import NO_REGION_REASON, render_overlay, write_index_html
from surfaceinspect.cli import app
from surfaceinspect.data.imageio import read_image
from surfaceinspect.errors import (
    EXIT_DEFECT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREADABLE,
    EXIT_USAGE,
)
from surfaceinspect.profiles import resolve_run_config
from surfaceinspect.storage import modeldir


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Consoles wide enough that no message is wrapped (assertions look for whole lines)."""
    monkeypatch.setattr(cli, "err_console", Console(stderr=True, width=1000))
    monkeypatch.setattr(cli, "out_console", Console(width=1000))


def run(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(toy_method, synthetic_dataset):
    result = run("train", "--no-export", "-m", "toy", synthetic_dataset / "train" / "good", "-q")
    assert result.exit_code == EXIT_OK, result.output
    return modeldir.latest_run()


@pytest.fixture
def good_copy(synthetic_dataset, tmp_path) -> Path:
    return Path(shutil.copytree(synthetic_dataset / "test" / "good", tmp_path / "d"))


def _records(path: Path) -> list[dict]:
    """The records of a file, without their ``time`` (when each verdict was made differs from run to run)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


# ---------------------------------------------------------------------------------------------- 1


def test_1_heatmap_and_score_never_write_into_or_over_their_input(trained, good_copy, tmp_path):
    before = tree_digest(good_copy)
    # --out equal to the input folder, or containing it: refused, nothing written
    for out in (good_copy, good_copy.parent):
        result = run("heatmap", good_copy, "--out", out)
        assert result.exit_code == EXIT_USAGE and "input" in result.output, result.output
    result = run("heatmap", good_copy / "000.png", "--out", good_copy)
    assert result.exit_code == EXIT_USAGE, result.output
    assert tree_digest(good_copy) == before and not (good_copy / "index.html").exists()

    # a dedicated subfolder: allowed, marked, and skipped by the next run (no overlays scored as inputs)
    first = run("heatmap", good_copy, "--out", good_copy / "hm", "--output", tmp_path / "a.jsonl")
    second = run("heatmap", good_copy, "--out", good_copy / "hm", "--output", tmp_path / "b.jsonl")
    assert first.exit_code == second.exit_code and first.exit_code in (EXIT_OK, EXIT_DEFECT)
    assert "skipping output folder" in second.output and "hm" in second.output
    assert _records(tmp_path / "a.jsonl") == _records(tmp_path / "b.jsonl")
    assert len(_records(tmp_path / "b.jsonl")) == 8
    assert {k: v for k, v in tree_digest(good_copy).items() if not k.startswith("hm/")} == before

    # a subfolder that already holds (input) images is not dedicated: refused even with --force
    (good_copy / "more").mkdir()
    shutil.copy(good_copy / "000.png", good_copy / "more" / "x.png")
    result = run("heatmap", good_copy, "--out", good_copy / "more", "--force")
    assert result.exit_code == EXIT_USAGE and "inside the input folder" in result.output

    # score: the records file can never be an input image, not even with --force
    result = run("score", good_copy, "--output", good_copy / "001.png", "--format", "csv", "--force")
    assert result.exit_code == EXIT_USAGE and "is an input image" in result.output
    assert digest(good_copy / "001.png") == before["001.png"]


# ---------------------------------------------------------------------------------------------- 2


def test_2_train_refuses_labelled_folders_and_dataset_roots(toy_method, synthetic_dataset, isolated_runs, real_dataset):
    result = run("train", "-m", "toy", synthetic_dataset / "test")
    assert result.exit_code == EXIT_USAGE
    assert "labelled folder" in result.output and f"train on {synthetic_dataset / 'test' / 'good'}" in result.output
    assert f"--calibration-dir {synthetic_dataset / 'test'}" in result.output
    result = run("train", "-m", "toy", synthetic_dataset)
    assert result.exit_code == EXIT_USAGE
    assert "MVTec layout" in result.output and f"train on {synthetic_dataset / 'train' / 'good'}" in result.output
    assert not isolated_runs.exists() or not any(isolated_runs.iterdir()), "no run directory may be created"
    # the suggested fix works
    result = run(
        "train",
        "--no-export",
        "-m",
        "toy",
        synthetic_dataset / "train" / "good",
        "--calibration-dir",
        synthetic_dataset / "test",
        "-q",
    )
    assert result.exit_code == EXIT_OK, result.output
    try:
        real = real_dataset("mvtec_bottle")
    except pytest.skip.Exception:
        return
    result = run("train", "-m", "toy", real)
    assert result.exit_code == EXIT_USAGE and "MVTec layout" in result.output


# ---------------------------------------------------------------------------------------------- 3


def test_3_recalibrate_refuses_too_few_or_labelled_images_keeps_a_backup_and_undoes(
    trained, synthetic_dataset, tmp_path
):
    calibration = trained / "calibration.json"
    original = calibration.read_bytes()
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(synthetic_dataset / "test" / "dent" / "000.png", one / "a.png")
    result = run("recalibrate", one)
    assert result.exit_code == EXIT_USAGE and "needs at least 4" in result.output
    result = run("recalibrate", synthetic_dataset / "test")
    assert result.exit_code == EXIT_USAGE and "--labelled" in result.output
    assert calibration.read_bytes() == original

    # defective images passed off as good: allowed (it may be a real change), but loudly
    defects = tmp_path / "defects"
    defects.mkdir()
    for kind in ("dent", "scratch", "stain"):
        for src in (synthetic_dataset / "test" / kind).glob("*.png"):
            shutil.copy(src, defects / f"{kind}_{src.name}")
    old = json.loads(original)
    result = run("recalibrate", defects)
    assert result.exit_code == EXIT_OK, result.output
    new = json.loads(calibration.read_text())
    assert f"image threshold {old['image_threshold']:.5g} -> {new['image_threshold']:.5g}" in result.output
    assert f"pixel threshold {old['pixel_threshold']:.5g} -> {new['pixel_threshold']:.5g}" in result.output
    assert "score above the previous threshold" in result.output and "recalibrate --undo" in result.output
    backups = modeldir.calibration_backups(trained)
    assert len(backups) == 1 and backups[0].read_bytes() == original

    # a proper good folder gives no such warning
    result = run("recalibrate", synthetic_dataset / "test" / "good")
    assert result.exit_code == EXIT_OK and "previous threshold" not in result.output
    assert len(modeldir.calibration_backups(trained)) == 2

    assert run("recalibrate", "--undo").exit_code == EXIT_OK
    assert json.loads(calibration.read_text()) == new
    result = run("recalibrate", "--undo")
    assert result.exit_code == EXIT_OK and "restored" in result.output
    assert calibration.read_bytes() == original
    result = run("recalibrate", "--undo")
    assert result.exit_code == EXIT_USAGE and "no earlier calibration" in result.output


# ---------------------------------------------------------------------------------------------- 4


def test_4_train_out_never_replaces_silently_and_latest_follows_the_new_run(
    toy_method, synthetic_dataset, tmp_path, isolated_runs
):
    good = synthetic_dataset / "train" / "good"
    model = tmp_path / "models" / "m1"
    assert run("train", "--no-export", "-m", "toy", good, "--out", model, "-q").exit_code == EXIT_OK
    assert modeldir.latest_run().resolve() == model.resolve()
    assert not (model.parent / "LATEST").exists(), "LATEST lives in the runs folder, not beside --out"
    result = run("score", synthetic_dataset / "test" / "good")  # no --model: the run just trained
    assert f"model: {model}" in result.output

    weights = digest(model / "model.safetensors")
    result = run("train", "-m", "toy", good, "--out", model, "--seed", "5")
    assert result.exit_code == EXIT_USAGE and "already holds a trained model" in result.output
    assert digest(model / "model.safetensors") == weights

    result = run("train", "--no-export", "-m", "toy", good, "--out", model, "--seed", "5", "--force", "-q")
    assert result.exit_code == EXIT_OK, result.output
    assert digest(model / "model.safetensors") != weights  # another seed, another calibration split

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = run("train", "-m", "toy", good, "--out", busy)
    assert result.exit_code == EXIT_USAGE and "not empty" in result.output
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    # a run in the runs folder is named by its name, as older versions wrote LATEST: still read
    assert run("train", "--no-export", "-m", "toy", good, "-q").exit_code == EXIT_OK
    latest = modeldir.latest_run()
    assert latest.parent == isolated_runs and (isolated_runs / "LATEST").read_text().strip() == latest.name


# ---------------------------------------------------------------------------------------------- 5


def test_5_markup_in_file_names_is_printed_as_is_and_errors_never_exit_0_1_3(
    trained, synthetic_dataset, tmp_path, monkeypatch
):
    folder = tmp_path / "camera"
    (folder / "lot[").mkdir(parents=True)
    shutil.copy(synthetic_dataset / "test" / "good" / "000.png", folder / "lot[" / "b]good.png")
    shutil.copy(synthetic_dataset / "test" / "good" / "001.png", folder / "[bold red]x.png")
    (folder / "lot[" / "red]bad.png").write_text("not an image")
    out = tmp_path / "r.jsonl"
    result = run("score", folder, "--output", out)
    records = {r["path"]: r for r in _records(out)}
    assert set(records) == {"lot[/b]good.png", "[bold red]x.png", "lot[/red]bad.png"}
    verdicts = {r["verdict"] for r in records.values()}
    assert result.exit_code == (EXIT_DEFECT if "defect" in verdicts else EXIT_UNREADABLE), result.output
    for name in records:
        assert name in result.output  # in the tables and the unreadable list, brackets and all

    # an internal error (a message full of markup) exits 4, with the message as it is
    def broken(*_args, **_kwargs):
        raise RuntimeError("boom [/b] [bold red]")

    monkeypatch.setattr(engine, "score_folder", broken)
    result = run("score", folder)
    assert result.exit_code == EXIT_INTERNAL and "boom [/b] [bold red]" in result.output

    # and the console-script entry point maps anything that escapes Typer to 4 as well
    monkeypatch.setattr(cli, "app", lambda: (_ for _ in ()).throw(ValueError("[/x] escaped")))
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == EXIT_INTERNAL


# ---------------------------------------------------------------------------------------------- 6


def _user_mistakes(tmp: Path, good: Path) -> list[tuple[list, str]]:
    (tmp / "file.txt").write_text("x")
    cases = [
        (["score", good, "--output", tmp / "file.txt" / "x.csv"], "is a file, not a folder"),
        (["heatmap", good, "--out", tmp / "file.txt" / "hm"], "is a file"),
        (["score", good, "--format", "xml", "--output", tmp / "x.csv"], "xml"),
        (["score", good, "--output", tmp / "x.csv", "--format", "jsonl"], "the extension says csv"),
        (["train", "-m", "toy"], "give the folder of good images"),
        (["train", "-m", "toy", good, "--lr", "nan"], "toy.lr: expected a finite number"),
        (["train", "-m", "toy", good, "--time-budget", "inf"], "time_budget_min: expected a finite number"),
        (["train", "-m", "toy", good, "--set", "common.calibration.fraction=.nan"], "expected a finite number"),
    ]
    if Path("/sys").is_dir():
        cases.append((["score", good, "--output", "/sys/surfaceinspect-test.csv"], "/sys/surfaceinspect-test.csv"))
    if Path("/dev/full").exists():
        cases.append((["score", good, "--output", "/dev/full", "--format", "csv"], "no space left"))
    return cases


def test_6_user_mistakes_exit_2_with_one_line(trained, good_copy, tmp_path):
    for args, message in _user_mistakes(tmp_path, good_copy):
        result = run(*args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "internal error" not in result.output and "Traceback" not in result.output
        lines = result.output.strip().splitlines()
        assert lines[0].startswith("error: "), (args, result.output)
        if "--format" in args and "xml" in args:  # a usage error: the one line, then where the help is
            assert lines[1:] == ["Try 'surfaceinspect score -h' for help."], (args, result.output)
        else:
            assert len(lines) == 1, (args, result.output)


# ---------------------------------------------------------------------------------------------- 7


def test_7_unreadable_images_are_listed_and_an_interrupted_heatmap_leaves_a_gallery(
    trained, good_copy, tmp_path, monkeypatch
):
    (good_copy / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    (good_copy / "empty.jpg").write_bytes(b"")
    result = run("heatmap", good_copy, "--out", tmp_path / "hm")
    assert result.exit_code in (EXIT_DEFECT, EXIT_UNREADABLE)
    assert "unreadable images (all 2):" in result.output
    assert re.search(r"broken\.png: .+", result.output) and "empty.jpg: file is empty" in result.output
    page = (tmp_path / "hm" / "index.html").read_text(encoding="utf-8")
    assert page.count('class="card error"') == 2 and "Unreadable (2)" in page
    assert "broken.png" in page and "file is empty (0 bytes)" in page

    real = engine.run_inference

    def interrupted(*args, **kwargs):
        for i, result in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(engine.scoring, "run_inference", interrupted)  # where score_folder looks it up
    result = run("heatmap", good_copy, "--out", tmp_path / "hm2")
    assert result.exit_code == EXIT_INTERRUPTED
    page = (tmp_path / "hm2" / "index.html").read_text(encoding="utf-8")
    assert page.rstrip().endswith("</html>") and page.count('class="card ') == 3
    assert "Interrupted: only the first 3 images were processed." in page


# ---------------------------------------------------------------------------------------------- 8


def test_8a_tiny_images_are_refused_not_scored(trained, good_copy):
    cv2.imwrite(str(good_copy / "dot.png"), np.full((1, 1, 3), 128, np.uint8))
    cv2.imwrite(str(good_copy / "sliver.png"), np.full((200, 4, 3), 128, np.uint8))
    result = run("score", good_copy, "--output", good_copy.parent / "r.jsonl")
    records = {r["path"]: r for r in _records(good_copy.parent / "r.jsonl")}
    for name, size in (("dot.png", "1x1"), ("sliver.png", "4x200")):
        assert records[name]["verdict"] == "error" and records[name]["score"] is None
        assert f"image is {size} pixels, too small to inspect" in records[name]["error"]
    assert result.exit_code in (EXIT_DEFECT, EXIT_UNREADABLE)


def test_8b_grey_images_on_a_colour_model_and_the_reverse_are_named(trained, toy_method, synthetic_dataset, tmp_path):
    grey_dir = tmp_path / "grey"
    for folder, src in ((grey_dir / "train", synthetic_dataset / "train" / "good"), (grey_dir / "test", None)):
        folder.mkdir(parents=True)
        for path in sorted((src or synthetic_dataset / "test" / "good").glob("*.png")):
            cv2.imwrite(str(folder / path.name), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    result = run("score", grey_dir / "test", "--model", trained)
    assert "8 image(s) are greyscale but the model was trained on colour images" in result.output
    result = run("score", synthetic_dataset / "test" / "good", "--model", trained)
    assert "greyscale" not in result.output

    grey_model = tmp_path / "grey_model"
    assert run("train", "--no-export", "-m", "toy", grey_dir / "train", "--out", grey_model, "-q").exit_code == EXIT_OK
    assert json.loads((grey_model / "metadata.json").read_text())["training"]["image_colour"] == "grey"
    result = run("score", synthetic_dataset / "test" / "good", "--model", grey_model)
    assert "8 image(s) are colour but the model was trained on grey images (000.png, 001.png" in result.output


def test_8c_python_warnings_do_not_leak(trained, good_copy, monkeypatch):
    # Pillow warns about a palette image with transparency bytes; decoding it must stay silent
    palette = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).convert("P")
    palette.save(good_copy / "palette.png", transparency=b"\x00" * 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_image(good_copy / "palette.png")
    assert caught == []
    # any other Python warning during a command becomes one plain "warning:" line
    real = engine.score_folder

    def warns(*args, **kwargs):
        warnings.warn("something odd", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "score_folder", warns)
    result = run("score", good_copy)
    assert "warning: something odd" in result.output
    assert "warnings.warn" not in result.output and "UserWarning" not in result.output


def test_8d_progress_rate_is_work_over_wall_time(monkeypatch):
    from surfaceinspect import ui

    clock = [100.0]
    monkeypatch.setattr(ui, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    buffer = io.StringIO()
    reporter = ui.Reporter(Console(file=buffer, width=200))
    with reporter.progress("score", 12) as bar:
        clock[0] += 1.5  # 12 images in 1.5 s, reported in batches of 4 at the very end
        for _ in range(3):
            bar.update(advance=4)
    assert "8.00 img/s" in buffer.getvalue() and "eta 0:00:00" in buffer.getvalue()
    with reporter.progress("train", 100, unit="step") as bar:  # resumed at step 40: count from there
        bar.update(completed=40)
        clock[0] += 10.0
        bar.update(completed=60)
    assert "2.00 step/s" in buffer.getvalue() and "eta 0:00:20" in buffer.getvalue()


def test_8e_profiles_lists_method_profile_pairs_that_work(toy_method):
    result = run("profiles")
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines() if "│" in line]
    pairs = [(r[0], r[1]) for r in rows if len(r) == 4 and r[0]]  # wrapped cells continue on rows without a method
    assert ("draem", "cpu") in pairs and ("csflow", "paper") in pairs and ("toy", "cpu") in pairs
    for method, profile in pairs:
        assert resolve_run_config(method=method, profile=profile).method == method


def test_8f_score_heatmap_recalibrate_take_threads_and_workers(trained, synthetic_dataset, tmp_path):
    good = synthetic_dataset / "test" / "good"
    for args in (
        ["score", good, "--threads", "2", "--workers", "1", "-q"],
        ["heatmap", good, "--out", tmp_path / "hm", "--threads", "2", "--workers", "1", "-q"],
        ["recalibrate", good, "--threads", "2", "--workers", "1", "--batch-size", "3", "-q"],
    ):
        torch.set_num_threads(1)
        result = run(*args)
        assert result.exit_code in (EXIT_OK, EXIT_DEFECT), (args, result.output)
        assert torch.get_num_threads() == 2, args


def test_8g_records_format_must_match_the_extension(trained, good_copy, tmp_path):
    result = run("score", good_copy, "--output", tmp_path / "x.csv", "--format", "jsonl")
    assert result.exit_code == EXIT_USAGE and "name the file x.jsonl" in result.output
    assert not (tmp_path / "x.csv").exists()
    assert run("score", good_copy, "--output", tmp_path / "x.txt", "--format", "jsonl", "-q").exit_code in (0, 1)
    assert len(_records(tmp_path / "x.txt")) == 8


def test_8h_existing_output_files_are_replaced_only_if_ours_or_forced(trained, good_copy, tmp_path):
    out = tmp_path / "results.csv"
    assert run("score", good_copy, "--output", out, "-q").exit_code in (0, 1)
    result = run("score", good_copy, "--output", out)
    assert "replacing" in result.output and "records of an earlier run" in result.output
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("serial,operator\n1,ann\n")
    result = run("score", good_copy, "--output", theirs)
    assert result.exit_code == EXIT_USAGE and "was not written by surfaceinspect" in result.output
    assert theirs.read_text() == "serial,operator\n1,ann\n"
    result = run("score", good_copy, "--output", theirs, "--force")
    assert result.exit_code in (0, 1) and "replacing" in result.output
    assert len(list(csv.DictReader(theirs.open()))) == 8


def test_8i_formula_like_names_are_neutralised_in_csv_only(trained, synthetic_dataset, tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    names = ["=1+2.png", "+cmd.png", "-2.png", "@sum.png", "plain.png"]
    for name in names:
        shutil.copy(synthetic_dataset / "test" / "good" / "000.png", folder / name)
    run("score", folder, "--output", tmp_path / "r.csv", "-q")
    run("score", folder, "--output", tmp_path / "r.jsonl", "-q")
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "r.csv").open(encoding="utf-8"))}
    assert set(rows) == {"'=1+2.png", "'+cmd.png", "'-2.png", "'@sum.png", "plain.png"}
    assert all(float(r["score"]) == pytest.approx(float(rows["plain.png"]["score"])) for r in rows.values())
    assert {r["path"] for r in _records(tmp_path / "r.jsonl")} == set(names)


def test_8j_help_says_o_is_a_file_in_score_and_a_folder_elsewhere():
    assert "-o" in run("score", "--help").output and "FILE" in run("score", "--help").output
    for command in ("train", "heatmap", "benchmark", "demo"):
        text = run(command, "--help").output
        assert re.search(r"--out\s+-o\s+DIR", text), command


# ---------------------------------------------------------------------------------------------- 9


def test_9_gallery_shows_model_thresholds_source_and_keeps_the_defect_visible(trained, synthetic_dataset, tmp_path):
    dents = synthetic_dataset / "test" / "dent"
    assert run("heatmap", dents, "--out", tmp_path / "hm", "-q").exit_code == EXIT_DEFECT
    page = (tmp_path / "hm" / "index.html").read_text(encoding="utf-8")
    cal = json.loads((trained / "calibration.json").read_text())
    meta = json.loads((trained / "metadata.json").read_text())
    for fact in (
        str(trained.resolve()),
        "toy",
        meta["created"],
        f"{cal['image_threshold']:.5g}",
        f"{cal['pixel_threshold']:.5g}",
        str(dents.resolve()),
    ):
        assert fact in page, fact

    # a defect card without a region says why
    entry = {"image": "a.png", "source": "a.png", "score": 2.0, "score_normalized": 0.7, "verdict": "defect"}
    page = write_index_html(tmp_path, [{**entry, "n_regions": 0}]).read_text(encoding="utf-8")
    assert NO_REGION_REASON in page
    page = write_index_html(tmp_path, [{**entry, "n_regions": 1}]).read_text(encoding="utf-8")
    assert NO_REGION_REASON not in page

    # under the hottest heat the surface texture is still there; --opacity 0 leaves only outlines
    rng = np.random.default_rng(0)
    texture = rng.integers(40, 220, (120, 120), np.uint8)
    image = np.repeat(texture[:, :, None], 3, axis=2)
    hot = np.ones((120, 120), np.float32)
    out = render_overlay(image, hot, "x", "defect").astype(float).mean(axis=2)
    region = slice(60, 110)
    assert np.corrcoef(out[region, region].ravel(), texture[region, region].ravel())[0, 1] > 0.9
    plain = render_overlay(image, hot, "x", "defect", alpha=0.0)
    np.testing.assert_array_equal(plain[region, region], image[region, region])
