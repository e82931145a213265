"""Latency and sustained rate of ``surfaceinspect watch``: file closed -> record written.

Starts the real CLI (``python -m surfaceinspect watch``) in a subprocess on an empty folder, then

1. latency: writes ``--n`` images one at a time, ``--interval`` seconds apart (slow enough that
   nothing queues), each with open/write/close (or ``--write rename``: a hidden temporary file
   renamed into place), and measures from the close (or the rename) to the moment the record
   line appears in the output file (polled every 2 ms);
2. sustained rate: writes ``--burst`` images as fast as it can and measures how many images per
   second the watch turns into records (from the first file closed to the last record written).

The images are read from ``--images`` (a folder, cycled), so decoding cost is that of real files.
Prints one JSON line per model on stdout, then the results as BENCHMARKS.md table rows on stderr.
Run it alone on an otherwise idle machine.

Models: ``--model RUN`` (repeatable), or ``--train GOOD_DIR`` to train a short model of the ``cpu``
profile of each ``--method`` (default: both) first: a few steps, since latency and rate depend on
the profile's architecture and input size, not on the trained weights (the records' verdicts of
such a model mean nothing). ``--keep DIR`` keeps those models, and uses them again the next time.

    .venv/bin/python benchmarks/watch_latency.py --train ../shared/data/mvtec_bottle/train/good \\
        --images ../shared/data/mvtec_bottle/test/good --keep /tmp/watch-models
    .venv/bin/python benchmarks/watch_latency.py --model RUN --images DIR --settle 0.1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from surfaceinspect.data.imageio import discover_images


class RecordClock:
    """Polls the records file and notes when each path's line first appears (wall clock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset, pending = 0, b""
        while not self._stop.is_set():
            if self.path.exists():
                with open(self.path, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
                now = time.time()
                offset += len(data)
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.seen.setdefault(json.loads(line)["path"], now)
            time.sleep(0.002)

    def wait_for(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(n not in self.seen for n in names):
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in self.seen]
                raise SystemExit(f"timed out waiting for {len(missing)} records, e.g. {missing[:3]}")
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def write_image(data: bytes, target: Path, mode: str) -> float:
    """Write ``data`` to ``target``; returns the wall time at which the file was complete."""
    if mode == "rename":
        temporary = target.with_name(f".{target.name}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)
        return time.time()
    with open(target, "wb") as handle:
        handle.write(data)
    return time.time()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# Short trainings for --train: latency and rate depend on the profile's architecture and input size,
# not on how well the weights are trained, so a few steps give the cost of a finished model.
SHORT_TRAINING = {"draem": ["draem.steps=5"], "csflow": ["csflow.epochs=1"]}


def train_short_model(method: str, data: Path, out: Path, threads: int) -> str:
    """A ``--profile cpu`` model of ``method`` trained for a few steps on ``data`` (see SHORT_TRAINING);
    one already in ``out`` (an earlier run's ``--keep``) is used as it is."""
    if (out / "metadata.json").is_file():
        return str(out)
    sets = [*SHORT_TRAINING[method], "common.time_budget_min=0"]
    # --no-export: watch scores with torch, as in the figures so far; `surfaceinspect export --model` on a
    # kept model (--keep) measures watch with ONNX Runtime instead
    command = [sys.executable, "-m", "surfaceinspect", "train", "--no-export", "-m", method, "--profile", "cpu"]
    command.append(str(data))
    command += ["--out", str(out), "--threads", str(threads), "-q", *[a for s in sets for a in ("--set", s)]]
    print(f"training a short {method} cpu-profile model in {out}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)
    return str(out)


def measure(model: str, args: argparse.Namespace) -> dict:
    """Latency and sustained rate of ``watch --model model`` (see the module docstring)."""
    sources = discover_images(args.images)
    if not sources:
        raise SystemExit(f"no images in {args.images}")
    payloads = [p.read_bytes() for p in sources[: max(args.n, args.burst, 1)]]
    suffixes = [p.suffix.lower() for p in sources[: len(payloads)]]
    work = Path(tempfile.mkdtemp(prefix="watch-latency-"))
    folder, output = work / "camera", work / "records.jsonl"
    folder.mkdir()
    command = [sys.executable, "-m", "surfaceinspect", "watch", str(folder), "--model", model]
    command += ["-o", str(output), "--settle", str(args.settle), "--threads", str(args.threads)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if line.startswith("watching "):
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    clock = RecordClock(output)
    try:
        if not ready.wait(300):
            raise SystemExit("watch did not start:\n" + "".join(log))
        # warm-up image (first inference allocates), not counted
        write_image(payloads[0], folder / f"warmup{suffixes[0]}", args.write)
        clock.wait_for([f"warmup{suffixes[0]}"], 120)

        latencies = []
        for i in range(args.n):
            name = f"lat_{i:04d}{suffixes[i % len(payloads)]}"
            closed = write_image(payloads[i % len(payloads)], folder / name, args.write)
            clock.wait_for([name], 120)
            latencies.append(clock.seen[name] - closed)
            time.sleep(max(0.0, args.interval - (time.time() - closed)))

        rate = None
        if args.burst:
            names, first_closed = [], None
            for i in range(args.burst):
                name = f"burst_{i:04d}{suffixes[i % len(payloads)]}"
                closed = write_image(payloads[i % len(payloads)], folder / name, args.write)
                first_closed = first_closed or closed
                names.append(name)
            clock.wait_for(names, 600)
            rate = args.burst / (max(clock.seen[n] for n in names) - first_closed)
    finally:
        clock.stop()
        # SIGTERM: the watch stops cleanly (SIGINT is ignored by processes started in the background).
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        shutil.rmtree(work, ignore_errors=True)

    metadata = json.loads((Path(model) / "metadata.json").read_text())
    return {
        "model": model,
        "method": metadata.get("method"),
        "profile": metadata["config"].get("profile"),
        "image_size": metadata["config"]["common"].get("image_size"),
        "settle_s": args.settle,
        "threads": args.threads,
        "write": args.write,
        "latency_images": args.n,
        "latency_ms_p50": round(1000 * statistics.median(latencies), 1),
        "latency_ms_p95": round(1000 * percentile(latencies, 0.95), 1),
        "latency_ms_max": round(1000 * max(latencies), 1),
        "burst_images": args.burst,
        "sustained_images_per_s": round(rate, 2) if rate else None,
        "watch_exit_code": proc.returncode,
    }


def markdown_table(reports: list[dict]) -> str:
    """The results as BENCHMARKS.md rows."""
    lines = [
        "| method (profile) | input | settle s | threads | latency p50 / p95 / max ms | sustained img/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r['method']} ({r['profile']}) | {r['image_size']} | {r['settle_s']} | {r['threads'] or 'all'} | "
            f"{r['latency_ms_p50']} / {r['latency_ms_p95']} / {r['latency_ms_max']} | {r['sustained_images_per_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="run directory written by train (repeatable)")
    parser.add_argument("--train", type=Path, help="train a short cpu-profile model per --method on these good images")
    parser.add_argument("--method", action="append", choices=sorted(SHORT_TRAINING), help="with --train (repeatable)")
    parser.add_argument("--keep", type=Path, help="with --train: keep the trained models in this folder")
    parser.add_argument("--images", required=True, type=Path, help="folder of sample images (cycled)")
    parser.add_argument("--n", type=int, default=30, help="images for the latency phase")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between images (latency phase)")
    parser.add_argument("--burst", type=int, default=60, help="images for the sustained-rate phase (0: skip)")
    parser.add_argument("--settle", type=float, default=0.5, help="watch --settle")
    parser.add_argument("--threads", type=int, default=0, help="watch --threads (0 = all cores)")
    parser.add_argument("--batch-size", type=int, default=None, help="watch --batch-size")
    parser.add_argument("--write", choices=("direct", "rename"), default="direct")
    args = parser.parse_args()
    if not args.model and not args.train:
        parser.error("give --model RUN (repeatable), or --train GOOD_DIR --method draem --method csflow")

    models = list(args.model)
    scratch = None
    if args.train:
        if args.keep is None:
            scratch = Path(tempfile.mkdtemp(prefix="watch-latency-models-"))
        folder = args.keep or scratch
        for method in args.method or sorted(SHORT_TRAINING):
            models.append(train_short_model(method, args.train, folder / f"{method}-cpu", args.threads or 0))
    reports = []
    try:
        for model in models:
            reports.append(measure(model, args))
            print(json.dumps(reports[-1]), flush=True)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(markdown_table(reports), file=sys.stderr)


if __name__ == "__main__":
    main()
