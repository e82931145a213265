"""Load test of ``surfaceinspect serve``: throughput and latency under concurrent clients, memory over time.

Starts the real CLI (``python -m surfaceinspect serve --port 0``) on loopback in a subprocess, then

1. baseline: ``engine.score_folder`` (what ``surfaceinspect score`` runs) on the same images, in this
   process, before the server starts: images per second of the batch command, model load excluded;
2. load (after 5 warm-up requests): for each ``--clients`` level (default 1, 4, 16), that many client
   threads (one keep-alive connection each) send ``--requests`` images in all to ``POST /score``, as
   fast as answers come: throughput and p50/p95/p99 latency (request sent -> record received);
3. bad burst: ``--bad`` bad requests (empty, not an image, truncated, wrong content type, over the
   size limit, broken multipart) mixed with as many good ones from 4 clients: every bad one must get
   a 4xx, every good one 200, nothing a 5xx, and ``/health`` must answer afterwards;
4. soak (``--soak-s``, off by default): 4 clients for that long while the server's resident memory
   (``VmRSS``) is sampled every second: growth from the end of the first tenth to the end;
5. SIGTERM: the server must exit 0.

The images come from a folder (cycled, read into memory once), so the decoding cost is that of real
files. Writes the results as JSON (``--out``, else stdout) and a markdown table on stderr. Run the real
measurement alone on an idle machine; a smoke run proves the script works:

    .venv/bin/python benchmarks/serve_load.py --model RUN ../shared/data/mvtec_bottle/test/good --soak-s 180
    .venv/bin/python benchmarks/serve_load.py --model RUN IMAGES --requests 20 --clients 1,4 --bad 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surfaceinspect.data.imageio import discover_images

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}
WARM_UP_REQUESTS = 5
CONTENT_TYPES |= {".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp"}


class Server:
    """``surfaceinspect serve`` in a subprocess on a free loopback port; its stderr is kept."""

    def __init__(self, model: str, extra: list[str], start_timeout: float = 300.0) -> None:
        command = [sys.executable, "-m", "surfaceinspect", "serve", "--model", model, "--port", "0", *extra]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        found = threading.Event()
        self.port = 0

        def drain() -> None:  # read stderr to its end, so the pipe never fills and blocks the server
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                match = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(start_timeout) or not self.port:
            self.proc.kill()
            raise SystemExit("the server did not start:\n" + "\n".join(self.lines[-20:]))
        deadline = time.monotonic() + 30
        while request(self.port, "GET", "/health")[0] != 200:
            if time.monotonic() > deadline:
                raise SystemExit("the server never became ready")
            time.sleep(0.05)

    def rss_mib(self) -> float:
        """The server's resident memory (Linux ``/proc``), in MiB; NaN where it cannot be read."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return math.nan
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else math.nan

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes]:
    """One request (on ``conn`` if given, kept alive); (status, body), or (0, b"") when the connection failed."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        conn.close()
        return 0, b""
    finally:
        if own:
            conn.close()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def drive(port: int, clients: int, jobs: list[Callable[..., tuple[str, int, float]]]) -> tuple[list, float]:
    """Run ``jobs`` from ``clients`` threads (one keep-alive connection each), each taking the next job as soon as
    its answer came; returns (kind, status, seconds) per job and the wall time."""
    lock = threading.Lock()
    results: list[tuple[str, int, float]] = []
    pending = list(reversed(jobs))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if not pending:
                    break
                job = pending.pop()
            outcome = job(conn)
            with lock:
                results.append(outcome)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - began


def score_job(port: int, name: str, data: bytes, content_type: str, kind: str = "good") -> Callable:
    def job(conn: http.client.HTTPConnection) -> tuple[str, int, float]:
        began = time.perf_counter()
        headers = {"Content-Type": content_type, "X-Image-Name": name}
        status, _body = request(port, "POST", "/score", data, headers, conn)
        return kind, status, time.perf_counter() - began

    return job


def oversize_job(port: int) -> Callable:
    """Declares a body far over the limit and sends only its start: the server must answer 413 at once."""

    def job(_conn: http.client.HTTPConnection) -> tuple[str, int, float]:
        began = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.putrequest("POST", "/score")
            conn.putheader("Content-Type", "image/png")
            conn.putheader("Content-Length", str(1 << 30))
            conn.endheaders(b"\x89PNG\r\n\x1a\n" + b"\0" * 65536)
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            status = 0
        finally:
            conn.close()
        return "bad", status, time.perf_counter() - began

    return job


def bad_jobs(port: int, png: bytes, n: int) -> list[Callable]:
    boundary = "b0und"
    broken_form = f"--{boundary}\r\nContent-Disposition: form-data\r\n\r\nnot a file".encode()
    kinds = [
        (b"", "image/png"),
        (b"this is not an image", "image/png"),
        (png[: max(1, len(png) // 3)], "image/png"),
        (png, "text/plain"),
        (broken_form, f"multipart/form-data; boundary={boundary}"),
    ]
    jobs: list[Callable] = []
    for i in range(n):
        if i % (len(kinds) + 1) == len(kinds):
            jobs.append(oversize_job(port))
        else:
            body, content_type = kinds[i % (len(kinds) + 1)]
            jobs.append(score_job(port, f"bad-{i}", body, content_type, kind="bad"))
    return jobs


def summarise(results: list[tuple[str, int, float]], seconds: float) -> dict[str, Any]:
    latencies = [s for kind, status, s in results if kind == "good" and status == 200]
    return {
        "requests": len(results),
        "ok": len(latencies),
        "failed": len(results) - len(latencies),
        "seconds": round(seconds, 3),
        "throughput_rps": round(len(latencies) / seconds, 2) if seconds > 0 else math.nan,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p95_ms": round(percentile(latencies, 95) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
    }


def baseline(model: str, images: list[Path], threads: int | None) -> dict[str, Any]:
    """``surfaceinspect score`` on the same images, in this process (the model loaded beforehand)."""
    from surfaceinspect import engine

    loaded = engine.load(model, device="cpu", threads=threads or 0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i, path in enumerate(images):
            (folder / f"{i:05d}{path.suffix.lower()}").symlink_to(path.resolve())
        began = time.perf_counter()
        summary = engine.score_folder(loaded, folder, on_result=lambda _r: None)
        seconds = time.perf_counter() - began
    return {
        "images": summary.total,
        "seconds": round(seconds, 3),
        "throughput_ips": round(summary.total / seconds, 2),
        "method": loaded.detector.name,
        "runtime": loaded.runtime,
    }


def markdown(report: dict[str, Any]) -> str:
    rows = [
        "| phase | clients | requests | ok | images/s | p50 ms | p95 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = report["baseline"]
    rows.append(f"| `score` (one process) | - | {base['images']} | {base['images']} | {base['throughput_ips']} | | | |")
    for level in report["load"]:
        rows.append(
            f"| serve /score | {level['clients']} | {level['requests']} | {level['ok']} | {level['throughput_rps']} | "
            f"{level['p50_ms']} | {level['p95_ms']} | {level['p99_ms']} |"
        )
    burst = report["bad_burst"]
    rows.append(
        f"\nbad burst: {burst['bad']} bad requests mixed with {burst['good']} good: statuses of the bad ones "
        f"{burst['bad_statuses']}, 5xx {burst['server_errors']}, good ones answered 200: {burst['good_ok']}, "
        f"health afterwards {burst['health_after']} -> {'PASS' if burst['passed'] else 'FAIL'}"
    )
    soak = report.get("soak")
    if soak:
        rows.append(
            f"soak: {soak['seconds']} s, {soak['requests']} requests ({soak['failed']} failed), server RSS "
            f"{soak['rss_start_mib']} -> {soak['rss_end_mib']} MiB (max {soak['rss_max_mib']}), growth after "
            f"warm-up {soak['rss_growth_mib']} MiB"
        )
    rows.append(f"SIGTERM: exit {report['exit_code']}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, help="folder of images to send (cycled)")
    parser.add_argument("--model", required=True, help="run folder (or export folder) to serve")
    parser.add_argument("--requests", type=int, default=200, help="requests per clients level (default 200)")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels (default 1,4,16)")
    parser.add_argument("--bad", type=int, default=30, help="bad requests in the burst (default 30)")
    parser.add_argument("--soak-s", type=float, default=0.0, help="soak for this many seconds (default 0: off)")
    parser.add_argument("--max-batch", type=int, default=None, help="serve --max-batch (default: serve's)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="serve --max-wait-ms (default: serve's)")
    parser.add_argument(
        "--threads", type=int, default=None, help="network CPU threads (torch or ONNX Runtime), server and baseline"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: stdout)")
    args = parser.parse_args()

    paths = discover_images(args.images)
    if not paths:
        raise SystemExit(f"no images in {args.images}")
    payloads = [(p.name, p.read_bytes(), CONTENT_TYPES.get(p.suffix.lower(), "image/png")) for p in paths]
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    extra: list[str] = []  # not -q: the "serving on" line gives the port
    for flag, value in (("--max-batch", args.max_batch), ("--max-wait-ms", args.max_wait_ms)):
        if value is not None:
            extra += [flag, str(value)]
    if args.threads is not None:
        extra += ["--threads", str(args.threads)]

    report: dict[str, Any] = {"model": args.model, "images": str(args.images), "cpus": os.cpu_count()}
    print("baseline: score in one process ...", file=sys.stderr)
    used = [paths[i % len(paths)] for i in range(min(args.requests, max(len(paths), 1)))]
    report["baseline"] = baseline(args.model, used, args.threads)

    server = Server(args.model, extra)
    try:
        report["rss_ready_mib"] = round(server.rss_mib(), 1)
        warm_up = [score_job(server.port, *payloads[i % len(payloads)]) for i in range(WARM_UP_REQUESTS)]
        drive(server.port, 1, warm_up)  # first-call costs (allocations, lazy initialisation) stay out of the numbers
        report["load"] = []
        for clients in levels:
            print(f"load: {clients} client(s), {args.requests} requests ...", file=sys.stderr)
            jobs = [score_job(server.port, *payloads[i % len(payloads)]) for i in range(args.requests)]
            results, seconds = drive(server.port, clients, jobs)
            report["load"].append({"clients": clients, **summarise(results, seconds)})

        print(f"bad burst: {args.bad} bad requests mixed with good ones ...", file=sys.stderr)
        bad = bad_jobs(server.port, payloads[0][1], args.bad)
        good = [score_job(server.port, *payloads[i % len(payloads)]) for i in range(args.bad)]
        mixed = [job for pair in zip(bad, good, strict=True) for job in pair]
        results, _seconds = drive(server.port, 4, mixed)
        bad_statuses = sorted({status for kind, status, _ in results if kind == "bad"})
        health = request(server.port, "GET", "/health")[0]
        burst = {
            "bad": args.bad,
            "good": args.bad,
            "bad_statuses": bad_statuses,
            "server_errors": sum(1 for _kind, status, _ in results if status >= 500),
            "good_ok": sum(1 for kind, status, _ in results if kind == "good" and status == 200),
            "health_after": health,
        }
        burst["passed"] = (
            all(400 <= s < 500 for s in bad_statuses)
            and burst["server_errors"] == 0
            and burst["good_ok"] == args.bad
            and health == 200
        )
        report["bad_burst"] = burst

        if args.soak_s > 0:
            print(f"soak: {args.soak_s:.0f} s with 4 clients ...", file=sys.stderr)
            report["soak"] = soak(server, payloads, args.soak_s)
        report["rss_end_mib"] = round(server.rss_mib(), 1)
    finally:
        report["exit_code"] = server.stop()
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    else:
        print(text)
    print(markdown(report), file=sys.stderr)
    if not report["bad_burst"]["passed"] or report["exit_code"] != 0:
        raise SystemExit(1)


def soak(server: Server, payloads: list[tuple[str, bytes, str]], seconds: float) -> dict[str, Any]:
    """4 clients for ``seconds`` while the server's RSS is sampled every second."""
    stop = threading.Event()
    lock = threading.Lock()
    outcomes: list[int] = []

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        i = offset
        while not stop.is_set():
            _name, data, content_type = payloads[i % len(payloads)]
            status, _ = request(server.port, "POST", "/score", data, {"Content-Type": content_type}, conn)
            with lock:
                outcomes.append(status)
            i += 4
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    samples: list[tuple[float, float]] = []
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        samples.append((round(time.monotonic() - began, 1), round(server.rss_mib(), 1)))
        time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    rss = [value for _t, value in samples]
    warm = rss[max(0, len(rss) // 10 - 1)] if rss else math.nan
    return {
        "seconds": round(time.monotonic() - began, 1),
        "requests": len(outcomes),
        "failed": sum(1 for s in outcomes if s != 200),
        "rss_start_mib": rss[0] if rss else math.nan,
        "rss_end_mib": rss[-1] if rss else math.nan,
        "rss_max_mib": max(rss) if rss else math.nan,
        "rss_growth_mib": round(rss[-1] - warm, 1) if rss else math.nan,
        "rss_median_mib": statistics.median(rss) if rss else math.nan,
        "samples": samples,
    }


if __name__ == "__main__":
    main()
