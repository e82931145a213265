"""``surfaceinspect watch`` (issue #16): new images scored once, complete; restarts resume; bounded runtimes.

Every watch here ends by itself (--stop-after / --idle-timeout, or a stop event), and the threads
are joined with a generous timeout, so a bug fails a test instead of hanging the suite.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surfaceinspect import engine
from surfaceinspect.cli import app
from surfaceinspect.errors import EXIT_DEFECT, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, OutputError
from surfaceinspect.storage import modeldir
from surfaceinspect.storage.records import open_records_for_append
from surfaceinspect.workflows.watch import SettleTracker, WatchOptions, watch_folder

TESTS_DIR = Path(__file__).resolve().parent
JOIN_TIMEOUT_S = 120.0


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def trained(toy_method, synthetic_dataset):
    result = run("train", "--no-export", "-m", "toy", synthetic_dataset / "train" / "good", "--seed", "0", "-q")
    assert result.exit_code == EXIT_OK, result.output
    return modeldir.latest_run()


@pytest.fixture
def images(synthetic_dataset) -> dict[str, Path]:
    test = synthetic_dataset / "test"
    return {
        "good0": test / "good" / "000.png",
        "good1": test / "good" / "001.png",
        "good2": test / "good" / "002.png",
        "good3": test / "good" / "003.png",
        "dent": test / "dent" / "000.png",
        "dent1": test / "dent" / "001.png",
    }


def _records(path: Path) -> list[dict]:
    """The records of a file, without their ``time`` (when each verdict was made differs from run to run)."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


class Watch:
    """watch_folder in a thread; ``join`` waits (bounded) for it to stop by itself."""

    def __init__(self, run_dir: Path, folder: Path, output: Path, **options) -> None:
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.records: list = []
        self.result = None
        self.error: BaseException | None = None
        model = engine.load(run_dir, device="cpu")

        def target() -> None:
            try:
                self.result = watch_folder(
                    model,
                    folder,
                    output,
                    WatchOptions(**options),
                    stop_event=self.stop,
                    on_record=self.records.append,
                    on_ready=self.ready.set,
                )
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread by join()
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def wait_for(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.records) < n and self.thread.is_alive():
            assert time.monotonic() < deadline, f"only {len(self.records)} of {n} records after {timeout} s"
            time.sleep(0.02)

    def join(self):
        self.thread.join(JOIN_TIMEOUT_S)
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(10)
            raise AssertionError("watch did not stop by itself")
        if self.error is not None:
            raise self.error
        return self.result


def test_settle_tracker_waits_for_a_quiet_file_and_retries_unreadable_ones(tmp_path):
    now = [0.0]
    tracker = SettleTracker(settle_s=1.0, error_grace_s=5.0, clock=lambda: now[0])
    path = tmp_path / "a.png"
    path.write_bytes(b"x")
    tracker.touch(path)
    assert tracker.due() == []
    now[0] = 0.9
    with open(path, "ab") as handle:
        handle.write(b"more")  # still being written: the clock starts again
    assert tracker.due() == []
    now[0] = 1.5
    assert tracker.due() == []
    now[0] = 2.0
    (ready,) = tracker.due()
    assert ready.path == path and not ready.final and path not in tracker
    tracker.failed(ready)  # unreadable: not retried while unchanged ...
    now[0] = 4.0
    assert tracker.due() == []
    now[0] = 5.95  # ... until the grace since its last change (at 0.9) has passed
    (ready,) = tracker.due()
    assert ready.final
    empty = tmp_path / "empty.png"
    empty.touch()
    tracker.touch(empty)
    now[0] = 8.0
    assert tracker.due() == []  # an empty file is not complete ...
    now[0] = 11.0
    assert [r.final for r in tracker.due()] == [True]  # ... unless it stays empty for the grace
    gone = tmp_path / "gone.png"
    gone.write_bytes(b"x")
    tracker.touch(gone)
    gone.unlink()
    now[0] = 20.0
    assert tracker.due() == [] and len(tracker) == 0


def _slow_write(source: Path, target: Path, seconds: float = 1.0, chunks: int = 10) -> None:
    data = source.read_bytes()
    step = len(data) // chunks + 1
    with open(target, "wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start : start + step])
            handle.flush()
            time.sleep(seconds / chunks)


def test_watch_scores_existing_copied_slow_renamed_and_corrupt_files_once(trained, images, tmp_path):
    folder = tmp_path / "camera"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(images["good0"], folder / "existing.png")
    (folder / "notes.txt").write_text("not an image")
    output = tmp_path / "out.jsonl"
    watch = Watch(trained, folder, output, settle_s=0.3, stop_after=5)
    watch.wait_for(1)  # the existing image is scored first
    shutil.copy(images["dent"], folder / "sub" / "copied.png")
    _slow_write(images["good1"], folder / "slow.png")  # ~1 s in 10 chunks, never quiet for 0.3 s
    tmp = folder / ".renamed.png.tmp"  # the rename-into-place pattern: hidden temporary, then rename
    shutil.copy(images["good2"], tmp)
    os.replace(tmp, folder / "renamed.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    result = watch.join()
    assert result.stopped_by == "stop-after"

    rows = _records(output)
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == len(by_path) == 5  # each image once
    assert set(by_path) == {"existing.png", "sub/copied.png", "slow.png", "renamed.png", "corrupt.png"}
    assert by_path["corrupt.png"]["verdict"] == "error" and by_path["corrupt.png"]["error"]
    assert by_path["sub/copied.png"]["verdict"] == "defect"
    # every readable image was scored complete: its record equals that of a plain `score` run
    reference = tmp_path / "reference.jsonl"
    run("score", folder, "--model", trained, "--output", reference, "-q")
    expected = {r["path"]: r for r in _records(reference)}
    for path in ("existing.png", "sub/copied.png", "slow.png", "renamed.png"):
        assert by_path[path] == expected[path], path
    assert result.summary.n_defect == 1 and result.summary.n_error == 1 and result.summary.total == 5


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_restart_resumes_without_rescoring(trained, images, tmp_path, suffix):
    folder = tmp_path / "camera"
    folder.mkdir()
    for name in ("good0", "good1", "dent"):
        shutil.copy(images[name], folder / f"{name}.png")
    output = tmp_path / f"out{suffix}"
    first = Watch(trained, folder, output, settle_s=0.1, stop_after=3).join()
    assert first.summary.total == 3 and len(_records(output)) == 3
    with open(output, "a", encoding="utf-8") as handle:
        handle.write('{"path": "good2.png", "verd' if suffix == ".jsonl" else "good2.png,go")  # killed mid-line
    shutil.copy(images["good2"], folder / "good2.png")
    shutil.copy(images["dent1"], folder / "dent1.png")
    second = Watch(trained, folder, output, settle_s=0.1, stop_after=2)
    result = second.join()
    assert sorted(r.path for r in second.records) == ["dent1.png", "good2.png"]  # only the new ones
    assert result.already_recorded == 3
    rows = _records(output)
    assert sorted(r["path"] for r in rows) == ["dent.png", "dent1.png", "good0.png", "good1.png", "good2.png"]
    if suffix == ".csv":
        assert output.read_text(encoding="utf-8").count("path,verdict,") == 1  # one header


def test_no_existing_scores_only_new_images_and_idle_timeout_stops(trained, images, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    shutil.copy(images["good0"], folder / "old.png")
    output = tmp_path / "out.jsonl"
    old = time.time() - 3600
    os.utime(folder / "old.png", (old, old))
    watch = Watch(trained, folder, output, settle_s=0.1, existing=False, idle_timeout_s=1.5)
    assert watch.ready.wait(60)
    shutil.copy(images["good1"], folder / "new.png")
    result = watch.join()
    assert result.stopped_by == "idle-timeout"
    assert [r["path"] for r in _records(output)] == ["new.png"]


def test_a_second_watch_on_the_same_output_is_refused(tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    writer, done, fmt = open_records_for_append(tmp_path / "out.jsonl", None, folder, force=False)
    try:
        assert done == set() and fmt == "jsonl"
        with pytest.raises(OutputError, match="being written by another surfaceinspect process"):
            open_records_for_append(tmp_path / "out.jsonl", None, folder, force=False)
    finally:
        writer.close()


def test_on_defect_runs_a_command_without_a_shell_and_defects_are_copied(trained, images, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    shutil.copy(images["good0"], folder / "good.png")
    shutil.copy(images["dent"], folder / "dent.png")
    nasty = "x; touch PWNED $(touch PWNED2).png"  # a shell would run these
    shutil.copy(images["dent"], folder / nasty)
    log = tmp_path / "hook.log"
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(sys.argv[-1] + '\\t' + os.environ['SURFACEINSPECT_SCORE_NORMALIZED'] + '\\n')\n"
    )
    command = shlex.join([sys.executable, str(hook)])
    defects = folder / "defects"  # inside the watched folder: marked, so never scored itself
    result = run(
        "watch", folder, "--model", trained, "-o", tmp_path / "out.jsonl", "--on-defect", command,
        "--defects-dir", defects, "--settle", "0.1", "--stop-after", "3",
    )  # fmt: skip
    assert result.exit_code == EXIT_DEFECT, result.output
    rows = {r["path"]: r for r in _records(tmp_path / "out.jsonl")}
    assert {p for p, r in rows.items() if r["verdict"] == "defect"} == {"dent.png", nasty}
    calls = dict(line.split("\t") for line in log.read_text().splitlines())
    assert set(calls) == {str(folder.resolve() / "dent.png"), str(folder.resolve() / nasty)}
    assert all(float(v) >= 0.5 for v in calls.values())
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    copies = sorted(p.name for p in defects.iterdir() if not p.name.startswith("."))
    assert copies == sorted(["dent.png", nasty])
    assert (defects / "dent.png").read_bytes() == (folder / "dent.png").read_bytes()


def test_refused_outputs_and_commands_fail_with_one_line_before_watching(trained, images, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    shutil.copy(images["good0"], folder / "a.png")
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text("my own notes\n")
    cases = [
        (["-o", tmp_path / "o.jsonl", "--defects-dir", folder], "is the input folder"),
        (["-o", folder / "a.png", "--format", "jsonl"], "is an input image"),
        (["-o", folder / "b.png"], "use a .csv or .jsonl"),
        (["-o", foreign], "was not written by surfaceinspect"),
        (["-o", tmp_path / "o.jsonl", "--on-defect", "no-such-command-xyz --flag"], "not found"),
        (["-o", tmp_path / "o.jsonl", "--on-defect", "'unbalanced"], "--on-defect"),
    ]
    for extra, message in cases:
        result = run("watch", folder, "--model", trained, *extra)
        assert result.exit_code == EXIT_USAGE, (extra, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (extra, result.output)
    assert foreign.read_text() == "my own notes\n" and not (tmp_path / "o.jsonl").exists()
    result = run("watch", folder / "a.png", "--model", trained, "-o", tmp_path / "o.jsonl")
    assert result.exit_code == EXIT_USAGE and "is not a folder" in result.output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_exits_130_sigterm_0_with_complete_records(trained, images, tmp_path, sig):
    folder = tmp_path / "camera"
    folder.mkdir()
    for name in ("good0", "good1"):
        shutil.copy(images[name], folder / f"{name}.png")
    output = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "cli_with_toy.py"), "watch", str(folder), "--model", str(trained),
         "-o", str(output), "--settle", "0.1", "-q"],
        env={**os.environ, "TOY_PROFILES": str(tmp_path)},
        stderr=subprocess.PIPE,
        text=True,
        # A suite started in the background (`pytest &`) passes on an ignored SIGINT, which the watch keeps.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (output.exists() and output.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "watch did not score the images"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == EXIT_INTERRUPTED, stderr
        assert "interrupted" in stderr and "Traceback" not in stderr
    else:  # how systemd stops a service: a clean stop (issue #30, item 12)
        assert proc.returncode == EXIT_OK and "error" not in stderr and "Traceback" not in stderr, stderr
    assert sorted(r["path"] for r in _records(output)) == ["good0.png", "good1.png"]
    assert output.read_text().endswith("\n")


def test_latency_benchmark_script_reports_percentiles_and_rate(synthetic_dataset, tmp_path):
    """benchmarks/watch_latency.py drives the real CLI end to end (a smoke test: it must not rot)."""
    sets = ["common.image_size=32", "common.batch_size=4", "common.workers=0", "common.time_budget_min=0",
            "draem.recon_width=8", "draem.disc_width=4", "draem.recon_levels=3", "draem.disc_levels=3",
            "draem.steps=2", "common.calibration.min_images=4"]  # fmt: skip
    run_dir = tmp_path / "model"
    good = synthetic_dataset / "train" / "good"
    train = ["train", "--no-export", "-m", "draem", "--profile", "cpu", good, "--out", run_dir, "-q"]
    result = run(*train, *[arg for item in sets for arg in ("--set", item)])
    assert result.exit_code == EXIT_OK, result.output
    out = _latency_benchmark(["--model", str(run_dir), "--model", str(run_dir)], synthetic_dataset / "test")
    assert out.returncode == 0, out.stderr[-2000:]
    reports = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(reports) == 2 and out.stderr.count("| draem (cpu) | 32 | 0.1 | 1 |") == 2  # one table row each
    for report in reports:
        assert 100 <= report["latency_ms_p50"] <= report["latency_ms_p95"] <= report["latency_ms_max"]  # >= settle
        assert report["sustained_images_per_s"] > 0 and report["watch_exit_code"] == EXIT_OK  # SIGTERM: a clean stop


def _latency_benchmark(args: list[str], images: Path) -> subprocess.CompletedProcess:
    script = TESTS_DIR.parent / "benchmarks" / "watch_latency.py"
    command = [sys.executable, str(script), *args, "--images", str(images)]
    command += ["--n", "3", "--interval", "0", "--burst", "4", "--settle", "0.1", "--threads", "1"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})


@pytest.mark.slow
def test_latency_benchmark_trains_a_short_cpu_profile_model_and_keeps_it(synthetic_dataset, tmp_path):
    keep = tmp_path / "models"
    args = ["--train", str(synthetic_dataset / "train" / "good"), "--method", "draem", "--keep", str(keep)]
    out = _latency_benchmark(args, synthetic_dataset / "test")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["method"] == "draem" and report["profile"] == "cpu" and report["image_size"] == 128
    training = json.loads((keep / "draem-cpu" / "metadata.json").read_text())["training"]
    assert training["steps"] == 5  # a short training: the profile's architecture, not its schedule
    again = _latency_benchmark(args, synthetic_dataset / "test")
    assert again.returncode == 0 and "training a short" not in again.stderr  # the kept model is used again


def test_stop_signals_set_a_flag_and_an_ignored_sigint_stays_ignored():
    """SIGTERM/Ctrl-C only set the stop flag (no exception mid-batch); a background job's ignored SIGINT is kept."""
    import threading

    from surfaceinspect.cli.watch import _signals_set

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = threading.Event()
        with _signals_set(stop):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert not stop.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert stop.is_set()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop = threading.Event()
        with _signals_set(stop):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.is_set()
            # a second Ctrl-C interrupts at once
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
