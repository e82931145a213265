"""Inference speed of a configuration in each runtime: torch eager, torch.compile, ONNX Runtime, OpenVINO.

Random weights (timing does not depend on them), the profile's input size. Every runtime runs the
same graph: ``Detector.predict`` for torch eager (what ``score`` runs), the detector's
``inference_module()`` for torch.compile, and its ONNX export (what ``surfaceinspect export``
writes) for ONNX Runtime and OpenVINO. Before timing, each runtime's scores and maps are compared
with torch eager on the same random batch (``parity_max_rel_diff``). Ratios are to torch eager
measured in the same process, so run it on an otherwise idle machine, one job at a time:

    .venv/bin/python benchmarks/runtimes.py --method draem --profile cpu --threads 2
    .venv/bin/python benchmarks/runtimes.py --method csflow --profile cpu --threads 2
    .venv/bin/python benchmarks/runtimes.py --method csflow --profile paper --threads 2 --batch 8
    .venv/bin/python benchmarks/runtimes.py --method draem --profile cpu --runtime onnx   (one runtime: its RSS)

Prints one JSON object: per runtime img/s at batch 1 and batched, p50/p95 batch-1 latency, GFLOP/s,
the ratio to torch eager and the fraction of ``--peak-gflops`` (the machine's measured fp32 peak,
``benchmarks/cpu_peak.py``); with onnx or openvino, the export's cost: ``export_seconds`` is what
``surfaceinspect export`` (and so the end of ``train``) spends on the model, the graph export
(``export_graph_seconds``) plus the parity check (torch and ONNX Runtime on 8 images). ``peak_rss_mb``
is the whole process's: compare it across runtimes only with one ``--runtime`` per process.

Every shipped profile (the speed figures of docs/deploy.md): ``--profile all`` (``--method`` repeatable,
default both) runs each profile in its own process, one after another, ONNX Runtime against torch
unless ``--runtime`` says otherwise; one JSON line per profile on stdout, a table on stderr:

    .venv/bin/python benchmarks/runtimes.py --profile all --threads 2
    .venv/bin/python benchmarks/runtimes.py --method draem --profile cpu --profile long --seconds 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import build  # the same detector construction as benchmarks/speed.py
from timing import measure

from surfaceinspect.deploy import runtimes
from surfaceinspect.deploy.export import PARITY_IMAGES, onnx_bytes
from surfaceinspect.errors import SurfaceInspectError
from surfaceinspect.workflows.benchmark import peak_rss_mb

RUNTIMES = ("torch", "compile", "onnx", "openvino")
SWEEP_RUNTIMES = ("torch", "onnx")  # --profile all: what `score` runs without and with the export
Runner = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


def torch_runner(det) -> Runner:
    def run(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        p = det.predict(x)
        return p.scores.numpy(), p.maps.numpy()

    return run


def compile_runner(det) -> Runner:
    module = torch.compile(det.inference_module())

    def run(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            s, m = module(x)
        return s.numpy(), m.numpy()

    return run


def graph_runner(model: bytes, runtime: str, threads: int) -> Runner:
    """The exported graph in onnxruntime or OpenVINO, as ``score --runtime`` runs it."""
    run_graph = runtimes.graph_runner(model, runtime, threads)
    return lambda x: run_graph(x.numpy())


def rel_diff(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Largest |difference| of scores and maps, relative to the largest |reference value|."""
    return max(float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)) for x, y in zip(a, b, strict=True))


def export_cost(det, xb: torch.Tensor, gen: torch.Generator, threads: int) -> tuple[bytes, float, float]:
    """The ONNX graph, and the seconds ``surfaceinspect export`` spends on it: export, then parity on 8 images.

    Mirrors :func:`surfaceinspect.deploy.export.export_run` without its file reading and writing: the graph
    export with two example images (one would fix the batch axis), then torch and a fresh ONNX Runtime
    session scoring the same parity images.
    """
    h, w = det.input_size
    parity = torch.rand(PARITY_IMAGES, 3, h, w, generator=gen)
    started = time.perf_counter()
    model = onnx_bytes(det.inference_module(), xb[:2] if len(xb) >= 2 else xb.repeat(2, 1, 1, 1))
    graph_seconds = time.perf_counter() - started
    torch_runner(det)(parity)
    runtimes.graph_runner(model, "onnx", threads)(parity.numpy())  # the parity itself: each runtime's entry
    return model, time.perf_counter() - started, graph_seconds


def configurations(methods: list[str], profiles: list[str]) -> list[tuple[str, str]]:
    """(method, profile) pairs to measure: ``all`` = every installed profile of each method."""
    from surfaceinspect.detectors import available_methods
    from surfaceinspect.profiles import method_profiles

    pairs = []
    for method in methods or available_methods():
        shipped = method_profiles(method)
        wanted = sorted(shipped) if "all" in profiles else profiles
        pairs += [(method, profile) for profile in wanted if profile in shipped]
    missing = sorted({p for p in profiles if p != "all"} - {p for _, p in pairs})
    if missing or not pairs:
        raise SystemExit(f"no such profile of {', '.join(methods or available_methods())}: {', '.join(missing)}")
    return pairs


def sweep(pairs: list[tuple[str, str]], args: argparse.Namespace) -> None:
    """Measure each (method, profile) in a process of its own; JSON lines on stdout, a table on stderr."""
    passed = [a for item in args.set for a in ("--set", item)]
    passed += [a for rt in args.runtime or SWEEP_RUNTIMES for a in ("--runtime", rt)]
    passed += ["--threads", str(args.threads), "--batch", str(args.batch), "--seconds", str(args.seconds)]
    passed += ["--peak-gflops", str(args.peak_gflops)]
    rows = []
    for method, profile in pairs:
        print(f"measuring {method} {profile} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--method", method, "--profile", profile, *passed]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:  # the last line of its error, and the next profile
            last = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
            report = {"method": method, "profile": profile, "failed": last[0]}
        else:
            report = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(report), flush=True)
        rows.append(report)
    print(table(rows), file=sys.stderr)


def table(reports: list[dict]) -> str:
    """The reports as a Markdown table: img/s of torch and ONNX Runtime at batch 1 and batched, export seconds."""

    def rate(report: dict, runtime: str, key: str) -> str:
        value = report.get("runtimes", {}).get(runtime, {}).get(key)
        return f"{value:.2f}" if isinstance(value, float) else "-"

    lines = [
        "| method | profile | input | batched | torch img/s b1 | onnx img/s b1 | torch img/s batched "
        "| onnx img/s batched | onnx/torch b1 | export s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        hw = "x".join(map(str, r.get("input_hw", []))) or "-"
        export_s = f"{r['export_seconds']:.1f}" if "export_seconds" in r else r.get("failed", "-")
        lines.append(
            f"| {r['method']} | {r['profile']} | {hw} | {r.get('batched', '-')} "
            f"| {rate(r, 'torch', 'images_per_s_batch1')} | {rate(r, 'onnx', 'images_per_s_batch1')} "
            f"| {rate(r, 'torch', 'images_per_s_batched')} | {rate(r, 'onnx', 'images_per_s_batched')} "
            f"| {rate(r, 'onnx', 'vs_torch_batch1')} | {export_s} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", default=[], help="repeatable [default with --profile all: every]")
    ap.add_argument("--profile", action="append", default=[], help="repeatable; all = every installed [default: cpu]")
    ap.add_argument("--set", action="append", default=[], help="override a setting, e.g. common.image_size=256")
    ap.add_argument("--threads", type=int, default=0, help="threads for every runtime (0 = all cores)")
    ap.add_argument("--runtime", action="append", choices=RUNTIMES, help="repeatable [default: all available]")
    ap.add_argument("--batch", type=int, default=0, help="batched measurement size (default: the profile's)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measure each batch size for about this long")
    ap.add_argument("--peak-gflops", type=float, default=120.0, help="measured machine fp32 peak (cpu_peak.py)")
    args = ap.parse_args()
    pairs = configurations(args.method, args.profile or ["cpu"])
    if len(pairs) > 1 or "all" in args.profile:
        sweep(pairs, args)
        return
    args.method, args.profile = pairs[0]

    det, run = build(args, [])
    det.init_random_weights()
    h, w = run.common.input_hw()
    gen = torch.Generator().manual_seed(0)
    x1 = torch.rand(1, 3, h, w, generator=gen)
    xb = torch.rand(args.batch or run.common.batch_size, 3, h, w, generator=gen)
    with FlopCounterMode(display=False) as counter:
        det.predict(x1)
    gflop = counter.get_total_flops() / 1e9
    threads = torch.get_num_threads()

    wanted = args.runtime or list(RUNTIMES)
    reference = torch_runner(det)(xb)
    model, export_seconds, graph_seconds = b"", None, None
    if {"onnx", "openvino"} & set(wanted):
        model, export_seconds, graph_seconds = export_cost(det, xb, gen, threads)
    builders = {
        "torch": lambda: torch_runner(det),
        "compile": lambda: compile_runner(det),
        "onnx": lambda: graph_runner(model, "onnx", threads),
        "openvino": lambda: graph_runner(model, "openvino", threads),
    }
    results: dict[str, dict] = {}
    for name in wanted:
        try:
            runner = builders[name]()
            parity = rel_diff(reference, runner(xb))
        except SurfaceInspectError as exc:  # runtime not installed: its install hint
            results[name] = {"skipped": str(exc)}
            continue
        except Exception as exc:  # noqa: BLE001 - report the runtime's failure and measure the others
            results[name] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        results[name] = {"parity_max_rel_diff": parity, **measure(runner, x1, xb, args.seconds)}
    eager = results.get("torch", {})
    for entry in results.values():
        if "images_per_s_batch1" not in entry:
            continue
        entry["gflop_per_s_batch1"] = gflop * entry["images_per_s_batch1"]
        entry["fraction_of_peak_batch1"] = entry["gflop_per_s_batch1"] / args.peak_gflops
        entry["fraction_of_peak_batched"] = gflop * entry["images_per_s_batched"] / args.peak_gflops
        if "images_per_s_batch1" in eager:
            entry["vs_torch_batch1"] = entry["images_per_s_batch1"] / eager["images_per_s_batch1"]
            entry["vs_torch_batched"] = entry["images_per_s_batched"] / eager["images_per_s_batched"]
    print(
        json.dumps(
            {
                "method": args.method,
                "profile": args.profile,
                "sets": args.set,
                "input_hw": [h, w],
                "batched": len(xb),
                "gflop_per_image": gflop,
                "threads": threads,
                **({"export_seconds": round(export_seconds, 2)} if export_seconds is not None else {}),
                **({"export_graph_seconds": round(graph_seconds, 2)} if graph_seconds is not None else {}),
                "runtimes": {
                    # parity differences are ~1e-6: rounding them to 4 decimals would print 0.0
                    k: {
                        m: round(v, 4) if isinstance(v, float) and m != "parity_max_rel_diff" else v
                        for m, v in e.items()
                    }
                    for k, e in results.items()
                },
                "peak_rss_mb": peak_rss_mb(),
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
