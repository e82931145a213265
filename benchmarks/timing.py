"""The batch-1 / batched timing loop shared by the speed scripts (no surfaceinspect import, so a
script can also run it in another project's environment, as vs_anomalib_csflow.py does)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def measure(run: Callable[[Any], Any], x1: Any, xb: Any, seconds: float) -> dict[str, float]:
    """img/s at batch 1 (``x1``) and batched (``xb``), p50/p95 batch-1 latency; ~``seconds`` each after warm-up."""
    for _ in range(3):  # warm-up: allocator, primitive creation, compilation
        run(x1)
    run(xb)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(latencies) < 5:
        t = time.perf_counter()
        run(x1)
        latencies.append(time.perf_counter() - t)
    rounds, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or rounds < 2:
        run(xb)
        rounds += 1
    latencies.sort()
    return {
        "images_per_s_batch1": len(latencies) / sum(latencies),
        "images_per_s_batched": rounds * len(xb) / (time.perf_counter() - t0),
        "latency_ms_p50": 1000 * statistics.median(latencies),
        "latency_ms_p95": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
    }
