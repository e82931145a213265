"""Plant-grade trust, data loss and scripts (issue #30, items 1-4, 12 and 13).

Each test is named after its item and uses the real mechanism: a FIFO made with ``os.mkfifo``,
real symbolic links, two concurrent processes, a real SIGTERM. Processes that could hang if a fix
regressed (a FIFO read) run as subprocesses with a timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from surfaceinspect import cli
from surfaceinspect.cli import app
from surfaceinspect.errors import EXIT_DEFECT, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREADABLE, EXIT_USAGE
from surfaceinspect.storage import modeldir

TESTS_DIR = Path(__file__).resolve().parent
TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Consoles wide enough that no message is wrapped (assertions look for whole lines)."""
    monkeypatch.setattr(cli, "err_console", Console(stderr=True, width=1000))
    monkeypatch.setattr(cli, "out_console", Console(width=1000))


def run(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def toy_env(tmp_path: Path, **config: str) -> dict[str, str]:
    """Environment for ``tests/cli_with_toy.py``: the toy profiles (``config``: extra toy settings)."""
    profiles = tmp_path / "toy_profiles"
    profiles.mkdir(exist_ok=True)
    toy = "".join(f"  {key}: {value}\n" for key, value in {"epochs": 2, **config}.items())
    for name in ("cpu", "paper"):
        (profiles / f"toy-{name}.yaml").write_text(
            "method: toy\ncommon:\n  image_size: 64\n  batch_size: 2\n  workers: 0\n"
            "  calibration:\n    min_images: 4\n    fraction: 0.2\ntoy:\n" + toy
        )
    return {**os.environ, "TOY_PROFILES": str(profiles), "COLUMNS": "1000"}  # no wrapped messages


def cli_process(tmp_path: Path, *args, **popen) -> subprocess.Popen:
    """The real CLI (toy detector registered) in its own process."""
    command = [sys.executable, str(TESTS_DIR / "cli_with_toy.py"), *[str(a) for a in args]]
    popen.setdefault("env", toy_env(tmp_path))
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def cli_run(tmp_path: Path, *args, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = cli_process(tmp_path, *args)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{args[0]} did not finish within {timeout} s: {stderr[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for(predicate, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def written_since(path: Path, before: str | None, lines: int) -> bool:
    """``path`` holds at least ``lines`` lines and differs from ``before`` (what an earlier run left)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return text != before and text.count("\n") >= lines


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def trained(toy_method, synthetic_dataset):
    result = run("train", "--no-export", "-m", "toy", synthetic_dataset / "train" / "good", "-q")
    assert result.exit_code == EXIT_OK, result.output
    return modeldir.latest_run()


@pytest.fixture
def slow_model(toy_method, synthetic_dataset, tmp_path):
    """A toy model that takes 0.4 s per batch to score, so a test can act while a run is in progress."""
    out = tmp_path / "slow_model"
    data = synthetic_dataset / "train" / "good"
    result = run("train", "--no-export", "-m", "toy", data, "--set", "toy.predict_delay_s=0.4", "--out", out, "-q")
    assert result.exit_code == EXIT_OK, result.output
    return out


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def good_copy(synthetic_dataset, tmp_path) -> Path:
    return Path(shutil.copytree(synthetic_dataset / "test" / "good", tmp_path / "d"))


# ---------------------------------------------------------------------------------------------- 4


def test_item4_fifo_and_device_named_png_are_reported_and_skipped_by_score(trained, good_copy, tmp_path):
    os.mkfifo(good_copy / "x.png")  # nobody ever writes into it: reading it would block forever
    os.symlink("/dev/zero", good_copy / "zero.png")  # endless: reading it would fill the memory
    output = tmp_path / "r.jsonl"
    done = cli_run(tmp_path, "score", good_copy, "--model", trained, "--output", output, timeout=60)
    assert done.returncode == EXIT_UNREADABLE, done.stderr
    by_path = {r["path"]: r for r in records(output)}
    assert len(by_path) == 10 and sum(r["verdict"] == "good" for r in by_path.values()) == 8
    assert by_path["x.png"]["verdict"] == "error" and "named pipe" in by_path["x.png"]["error"]
    assert by_path["zero.png"]["verdict"] == "error" and "a device" in by_path["zero.png"]["error"]
    assert "x.png: is a named pipe (FIFO), not a regular image file" in done.stdout


def test_item4_training_skips_a_fifo_and_a_device_and_says_so(synthetic_dataset, tmp_path):
    data = Path(shutil.copytree(synthetic_dataset / "train" / "good", tmp_path / "train"))
    os.mkfifo(data / "x.png")
    os.symlink("/dev/zero", data / "zero.png")
    done = cli_run(tmp_path, "train", "--no-export", "-m", "toy", data, "--out", tmp_path / "model", timeout=90)
    assert done.returncode == EXIT_OK, done.stderr
    assert "skipped unreadable training image" in done.stderr and "named pipe" in done.stderr
    assert "zero.png" in done.stderr and "a device" in done.stderr


def test_item4_reads_are_bounded_and_a_symlink_loop_is_named(tmp_path, monkeypatch):
    from surfaceinspect.data import imageio
    from surfaceinspect.errors import ImageReadError

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 5000)
    monkeypatch.setattr(imageio, "MAX_FILE_BYTES", 4096)
    with pytest.raises(ImageReadError, match=r"file is 4\.88 KiB, more than the 4 KiB limit"):
        imageio.read_image(big)
    os.symlink("loop.png", tmp_path / "loop.png")
    with pytest.raises(ImageReadError, match="symbolic link loop"):
        imageio.read_image(tmp_path / "loop.png")
    os.symlink("missing.png", tmp_path / "dangling.png")
    with pytest.raises(ImageReadError, match="broken symbolic link"):
        imageio.read_image(tmp_path / "dangling.png")


# ---------------------------------------------------------------------------------------------- 1


def test_item1_concurrent_score_same_output_refused(slow_model, synthetic_dataset, tmp_path):
    output = tmp_path / "shared.jsonl"
    part = tmp_path / "shared.jsonl.part"
    args = ("score", synthetic_dataset / "test", "--model", slow_model, "--output", output, "--batch-size", "1")
    first = cli_process(tmp_path, *args, "-q")
    try:
        wait_for(lambda: part.exists() and part.read_text().count("\n") >= 1, proc=first)
        second = run(*args)  # this test process is the second writer
        assert first.poll() is None, "the first run must still be writing"
        assert second.exit_code == EXIT_USAGE
        line = one_line(second.output)
        assert f"--output {output} is being written by another surfaceinspect process (pid {first.pid} on " in line
        assert "`surfaceinspect score " in line and "give each run its own file" in line
        _, stderr = first.communicate(timeout=TIMEOUT_S)
    finally:
        first.kill()
    assert first.returncode == EXIT_DEFECT, stderr
    rows = records(output)  # every line one whole record: nothing spliced in
    assert len(rows) == len({r["path"] for r in rows}) == 17
    assert not part.exists() and not (tmp_path / ".shared.jsonl.lock").exists()


def test_item1_concurrent_heatmap_and_train_into_one_out_refused(slow_model, synthetic_dataset, tmp_path):
    out = tmp_path / "hm"
    first = cli_process(tmp_path, "heatmap", synthetic_dataset / "test", "--model", slow_model, "--out", out, "-q")
    try:
        wait_for(lambda: any(out.rglob("*.png")), proc=first)
        second = run("heatmap", synthetic_dataset / "test", "--model", slow_model, "--out", out, "--force")
        assert second.exit_code == EXIT_USAGE
        assert f"--out {out} is being written by another surfaceinspect process (pid {first.pid}" in one_line(
            second.output
        )
    finally:
        first.kill()
        first.communicate()

    data = synthetic_dataset / "train" / "good"
    run_dir = tmp_path / "run"
    first = cli_process(
        tmp_path, "train", "--no-export", "-m", "toy", data, "--out", run_dir, "--set", "toy.step_delay_s=0.2"
    )
    try:
        wait_for(lambda: (run_dir / ".surfaceinspect-output").exists(), proc=first)
        for force in ([], ["--force"]):  # --force must not delete the files of the run in progress either
            second = run("train", "-m", "toy", data, "--out", run_dir, *force)
            assert second.exit_code == EXIT_USAGE
            line = one_line(second.output)
            assert f"--out {run_dir} is being written by another surfaceinspect process (pid {first.pid}" in line
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # the kernel dropped the killed run's lock: the next run is not blocked by its leftover lock file
    result = run("train", "--no-export", "-m", "toy", data, "--out", run_dir, "--force", "-q")
    assert result.exit_code == EXIT_OK, result.output
    assert not (tmp_path / ".run.lock").exists()


def test_item1_resume_of_a_run_another_process_writes_is_refused(toy_method, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(  # another process holds the run directory's lock, as a running train does
        [sys.executable, "-c", "import sys, time; from surfaceinspect.storage.outputs import lock_output; "
         f"lock = lock_output({str(run_dir)!r}, '--out'); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run("train", "--resume", run_dir)
        assert result.exit_code == EXIT_USAGE
        assert f"--resume {run_dir} is being written by another surfaceinspect process (pid {holder.pid}" in one_line(
            result.output
        )
    finally:
        holder.kill()
        holder.communicate()


# ---------------------------------------------------------------------------------------------- 2


def test_item2_rerun_over_own_output_never_loses_earlier_records(trained, slow_model, synthetic_dataset, tmp_path):
    output = tmp_path / "k.csv"
    part = tmp_path / "k.csv.part"
    data = synthetic_dataset / "test"
    assert run("score", data, "--model", trained, "--output", output, "-q").exit_code == EXIT_DEFECT
    earlier = output.read_bytes()
    assert earlier.count(b"\n") == 18  # header + 17 records

    args = ("score", data, "--model", slow_model, "--output", output, "--batch-size", "1")
    for sig in (signal.SIGKILL, signal.SIGINT):
        leftover = part.read_text() if part.exists() else None  # until this run starts writing
        proc = cli_process(tmp_path, *args)
        try:
            wait_for(lambda before=leftover: written_since(part, before, 3), proc=proc)
            assert output.read_bytes() == earlier  # not emptied at the start
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=TIMEOUT_S)
        finally:
            proc.kill()
        assert output.read_bytes() == earlier  # the earlier records survive the kill ...
        kept = part.read_text(encoding="utf-8")  # ... and what the killed run computed is kept
        assert kept.startswith("path,verdict,") and kept.endswith("\n") and kept.count("\n") >= 3
        if sig == signal.SIGINT:
            assert proc.returncode == EXIT_INTERRUPTED
            assert f"record(s) are in {part}; {output} is unchanged" in stderr
    # told at the start where the records go, and a completed run replaces the file atomically
    result = run("score", data, "--model", trained, "--output", output)
    assert f"replacing {part}, left by an interrupted run" in result.output
    assert f"replacing {output} (records of an earlier run) when this run completes" in result.output
    assert _without_time(output.read_text()) == _without_time(earlier.decode()) and not part.exists()


def _without_time(csv_text: str) -> list[dict]:
    """The records of a CSV file without their ``time`` (when each verdict was made differs between runs)."""
    import csv
    import io

    return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(io.StringIO(csv_text))]


# ---------------------------------------------------------------------------------------------- 3


def test_item3_heatmap_refuses_symlink_below_out_and_never_writes_through_it(trained, synthetic_dataset, tmp_path):
    data = synthetic_dataset / "test"
    out = tmp_path / "hm"
    assert run("heatmap", data, "--model", trained, "--out", out, "-q").exit_code == EXIT_DEFECT
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "000.png").write_bytes(b"someone else's file")
    shutil.rmtree(out / "dent")
    os.symlink(victim, out / "dent")  # HM/sub replaced by a link to another folder
    result = run("heatmap", data, "--model", trained, "--out", out)
    assert result.exit_code == EXIT_USAGE
    assert f"--out {out}: {out / 'dent'} is a symbolic link (to {victim}); outputs are never written" in one_line(
        result.output
    )
    assert (victim / "000.png").read_bytes() == b"someone else's file" and sorted(os.listdir(victim)) == ["000.png"]

    # a link made after the check (while the run is going on) fails the write, never redirects it
    from surfaceinspect.storage.atomic import write_bytes_atomic

    with pytest.raises(OSError, match="symbolic link below an output folder") as caught:
        write_bytes_atomic(out / "dent" / "000.png", b"overlay", below=out)
    assert caught.value.filename == str(out / "dent")
    os.symlink(victim / "000.png", out / "good" / "link.png")  # the file itself a link: refused as well
    with pytest.raises(OSError, match="symbolic link below an output folder"):
        write_bytes_atomic(out / "good" / "link.png", b"overlay", below=out)
    assert (victim / "000.png").read_bytes() == b"someone else's file"


def test_item3_watch_defects_dir_refuses_symlink_below_it(trained, synthetic_dataset, tmp_path):
    from surfaceinspect.workflows.defect_actions import copy_defect

    folder = tmp_path / "camera"
    (folder / "sub").mkdir(parents=True)
    dent = synthetic_dataset / "test" / "dent" / "000.png"
    shutil.copy(dent, folder / "sub" / "x.png")
    defects = tmp_path / "defects"
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "x.png").write_bytes(b"keep me")
    assert copy_defect(folder / "sub" / "x.png", "sub/x.png", defects).read_bytes() == dent.read_bytes()
    shutil.rmtree(defects / "sub")
    os.symlink(victim, defects / "sub")
    # at start: refused before anything is watched
    result = run("watch", folder, "--model", trained, "-o", tmp_path / "w.jsonl", "--defects-dir", defects)
    assert result.exit_code == EXIT_USAGE
    assert f"--defects-dir {defects}: {defects / 'sub'} is a symbolic link" in one_line(result.output)
    # made while watching: the copy fails (a warning in the watch), the linked folder is untouched
    with pytest.raises(OSError, match="symbolic link below an output folder"):
        copy_defect(folder / "sub" / "x.png", "sub/x.png", defects)
    assert (victim / "x.png").read_bytes() == b"keep me" and os.listdir(victim) == ["x.png"]


# ---------------------------------------------------------------------------------------------- 12


def test_item12_no_fail_on_defect_lets_set_e_scripts_read_their_results(trained, synthetic_dataset, tmp_path):
    data = synthetic_dataset / "test"
    assert run("score", data, "--model", trained, "-q").exit_code == EXIT_DEFECT
    assert run("score", data, "--model", trained, "-q", "--no-fail-on-defect").exit_code == EXIT_OK
    result = run("heatmap", data, "--model", trained, "--out", tmp_path / "hm", "-q", "--no-fail-on-defect")
    assert result.exit_code == EXIT_OK
    broken = Path(shutil.copytree(data / "dent", tmp_path / "dent"))
    (broken / "bad.png").write_bytes(b"not a png")
    result = run("score", broken, "--model", trained, "-q", "--no-fail-on-defect")
    assert result.exit_code == EXIT_UNREADABLE  # unreadable images still stop a script

    cli_command = f"{sys.executable} {TESTS_DIR / 'cli_with_toy.py'}"
    script = f"""set -euo pipefail
{cli_command} score {data} --model {trained} --output {tmp_path / "r.jsonl"} -q --no-fail-on-defect
echo "defects: $(grep -c '"defect"' {tmp_path / "r.jsonl"})"
"""
    done = subprocess.run(["bash", "-c", script], env=toy_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("defects: "), done.stderr
    assert int(done.stdout.split()[1]) == sum(r["verdict"] == "defect" for r in records(tmp_path / "r.jsonl")) > 0


def test_item12_watch_stopped_by_sigterm_exits_0_with_a_summary(trained, synthetic_dataset, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    shutil.copy(synthetic_dataset / "test" / "good" / "000.png", folder / "a.png")
    shutil.copy(synthetic_dataset / "test" / "dent" / "000.png", folder / "b.png")
    output = tmp_path / "w.jsonl"
    proc = cli_process(tmp_path, "watch", folder, "--model", trained, "-o", output, "--settle", "0.1")
    try:
        wait_for(lambda: written_since(output, None, 2), proc=proc)
        proc.send_signal(signal.SIGTERM)  # what `systemctl stop` sends
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_OK, stderr  # a requested stop, even though a defect was seen
    assert "error" not in stderr and "interrupted" not in stderr
    summary = " ".join(stdout.split())  # the table title wraps to the table's width
    assert re.search(r"2 images in \d+\.\d s of watching, \d+\.\d s scoring", summary), stdout
    assert "stopped by SIGTERM" in summary
    assert "[torch on cpu]" in stderr  # it says which runtime scores (item 13)


# ---------------------------------------------------------------------------------------------- 13


def test_item13_sigterm_during_heatmap_leaves_index_html(slow_model, synthetic_dataset, tmp_path):
    out = tmp_path / "hm"
    proc = cli_process(tmp_path, "heatmap", synthetic_dataset / "test", "--model", slow_model, "--out", out)
    try:
        wait_for(lambda: len(list(out.rglob("*.png"))) >= 2, proc=proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, stderr  # a batch job stopped half-way: not a verdict
    assert "error: interrupted (SIGTERM)" in stderr and "Traceback" not in stderr
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.rstrip().endswith("</html>") and "Interrupted: only the first" in page


def test_item13_watch_summary_has_real_durations_and_names_the_runtime(trained, synthetic_dataset, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    for i in range(3):
        shutil.copy(synthetic_dataset / "test" / "good" / f"00{i}.png", folder / f"{i}.png")
    args = ("watch", folder, "--model", trained, "-o", tmp_path / "w.jsonl", "--settle", "0.1", "--stop-after", "3")
    result = run(*args)
    assert result.exit_code == EXIT_OK, result.output
    assert f"model: {trained} (toy, model id " in result.output and "[torch on cpu]" in result.output
    title = re.search(r"3 images in (\d+\.\d) s of watching, (\d+\.\d) s scoring", " ".join(result.output.split()))
    assert title and float(title.group(1)) > 0  # was "3 images in 0.0 s"


def test_item13_files_that_are_not_images_are_named_and_every_suffix_listed(trained, good_copy, tmp_path):
    from surfaceinspect.data.imageio import IMAGE_EXTENSIONS

    (good_copy / "inspection.pdf").write_bytes(b"%PDF-1.4")
    (good_copy / "earlier.csv").write_text("path,verdict\n")  # records are not pictures: not named
    result = run("score", good_copy, "--model", trained, "-q", "--output", good_copy / "r.csv")
    assert result.exit_code in (EXIT_OK, EXIT_DEFECT)
    line = next(line for line in result.output.splitlines() if "skipped" in line)
    assert line.startswith("warning: 1 file skipped, not in an image format that is read (.bmp, ")
    assert line.endswith(f"): {good_copy / 'inspection.pdf'}")
    empty = tmp_path / "only_pdf"
    empty.mkdir()
    (empty / "a.pdf").write_bytes(b"%PDF-1.4")
    result = run("score", empty, "--model", trained)
    assert result.exit_code == EXIT_USAGE
    message = result.output.splitlines()[-1]
    assert message.startswith(f"error: no images found in {empty}")
    assert all(suffix in message for suffix in IMAGE_EXTENSIONS), message


def test_item13_one_image_is_singular_and_too_few_images_asks_for_more_images(trained, good_copy, tmp_path):
    result = run("score", good_copy / "000.png", "--model", trained)
    assert "1 image in " in result.output and "1 images" not in result.output
    few = tmp_path / "few"
    few.mkdir()
    for name in ("000.png", "001.png", "002.png"):
        shutil.copy(good_copy / name, few / name)
    result = run("train", "-m", "toy", few, "--out", tmp_path / "run")
    assert result.exit_code == EXIT_USAGE
    line = one_line(result.output)
    assert f"{few}: 3 good images, but training needs at least 6" in line
    fix = line.index("add images of defect-free parts")
    assert "lower" not in line and fix < line.index("common.calibration.min_images")


def test_item13_symlink_loop_is_named_as_a_loop(trained, good_copy, tmp_path):
    os.symlink("loop.png", good_copy / "loop.png")
    result = run("score", good_copy / "loop.png", "--model", trained)
    assert result.exit_code == EXIT_USAGE
    assert one_line(result.output) == (
        f"error: {good_copy / 'loop.png'} is a symbolic link loop (it leads back to itself); "
        "give an image file or a folder of images"
    )
    result = run("score", good_copy, "--model", trained, "--output", tmp_path / "r.jsonl")
    assert result.exit_code == EXIT_UNREADABLE
    by_path = {r["path"]: r for r in records(tmp_path / "r.jsonl")}
    assert by_path["loop.png"]["error"] == "symbolic link loop (the link leads back to itself)"


def test_item13_openvino_and_onnx_hints_name_the_running_python(monkeypatch):
    from surfaceinspect.deploy import runtimes
    from surfaceinspect.errors import ModelDirError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ModelDirError, match=re.escape(f"`{sys.executable} -m pip install onnxruntime`")):
        runtimes.import_onnxruntime()
    with pytest.raises(ModelDirError) as caught:
        runtimes.import_openvino()
    assert f"`{sys.executable} -m pip install 'openvino>=2025.0'`" in str(caught.value)
    assert ".venv/bin/pip" not in str(caught.value)


def test_item13_damaged_model_files_exit_2_and_a_manifest_cannot_point_outside(trained, good_copy, tmp_path):
    image = good_copy / "000.png"

    def refused(model: Path, message: str) -> None:
        result = run("score", image, "--model", model)
        assert result.exit_code == EXIT_USAGE, result.output
        assert message in one_line(result.output) and "internal error" not in result.output

    deep = Path(shutil.copytree(trained, tmp_path / "deep"))
    (deep / "metadata.json").write_text('{"format_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(deep, "metadata.json is corrupt (not valid JSON)")

    text_threshold = Path(shutil.copytree(trained, tmp_path / "text_threshold"))
    calibration = json.loads((text_threshold / "calibration.json").read_text())
    calibration["image_threshold"] = "0.5"
    (text_threshold / "calibration.json").write_text(json.dumps(calibration))
    refused(text_threshold, "calibration.json: image_threshold is '0.5', not a finite number")

    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(trained / "calibration.json", export)
    manifest = {"format": "surfaceinspect-export", "format_version": 1, "method": "toy", "model_sha256": "0"}
    manifest["config"] = json.loads((trained / "metadata.json").read_text())["config"]
    for name in ("../" * 12 + "etc/passwd", "/etc/passwd", "model.onnx"):
        if name == "model.onnx":
            os.symlink("/etc/passwd", export / name)  # a link leading out of the folder
        (export / "export.json").write_text(json.dumps({**manifest, "model_file": name}))
        refused(export, f"names the model file {name!r}, which is not a file of the export folder")


def test_score_json_into_a_reader_that_stops_exits_141_quietly_and_keeps_its_records(slow_model, synthetic_dataset,
                                                                                   tmp_path):  # fmt: skip
    """`score --json | head -1`: no "internal error" (exit 4) when the pipe closes; the records so far are kept."""
    output = tmp_path / "records.jsonl"
    proc = cli_process(tmp_path, "score", synthetic_dataset / "test", "--model", slow_model, "--json", "-o", output)
    try:
        first = proc.stdout.readline()
        proc.stdout.close()  # what head does after its line
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads(first)["verdict"] in ("good", "defect")
    assert proc.returncode == 141, stderr
    assert "internal error" not in stderr and "Traceback" not in stderr
    partial = tmp_path / "records.jsonl.part"
    assert not output.exists() and records(partial)[0]["path"] == json.loads(first)["path"]
