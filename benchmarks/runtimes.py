"""Inference speed of one configuration in each runtime: torch eager, torch.compile, ONNX Runtime, OpenVINO.

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
``benchmarks/cpu_peak.py``). ``peak_rss_mb`` is the whole process's: compare it across runtimes
only with one ``--runtime`` per process.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import build  # the same detector construction as benchmarks/speed.py
from timing import measure

from surfaceinspect.deploy import runtimes
from surfaceinspect.deploy.export import onnx_bytes
from surfaceinspect.errors import SurfaceInspectError
from surfaceinspect.workflows.benchmark import peak_rss_mb

RUNTIMES = ("torch", "compile", "onnx", "openvino")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="override a setting, e.g. common.image_size=256")
    ap.add_argument("--threads", type=int, default=0, help="threads for every runtime (0 = all cores)")
    ap.add_argument("--runtime", action="append", choices=RUNTIMES, help="repeatable [default: all available]")
    ap.add_argument("--batch", type=int, default=0, help="batched measurement size (default: the profile's)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measure each batch size for about this long")
    ap.add_argument("--peak-gflops", type=float, default=120.0, help="measured machine fp32 peak (cpu_peak.py)")
    args = ap.parse_args()

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
    model = onnx_bytes(det.inference_module(), xb[:2]) if {"onnx", "openvino"} & set(wanted) else b""
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
