"""What this CPU delivers in dense fp32 / bf16 matrix products: the ceiling for any network's speed.

Convolutions run as matrix products (oneDNN), so a model's img/s can never exceed
peak GFLOP/s / (GFLOP per image). Prints one JSON object; run it on an otherwise idle machine.

    .venv/bin/python benchmarks/cpu_peak.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def gflops(dtype: torch.dtype, n: int, seconds: float) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN/MKL picks its kernel)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else "flags : \n"
    flags = cpuinfo.split("flags", 2)[1].split("\n", 1)[0].split()
    out = {
        "threads": args.threads,
        "size": args.size,
        "fp32_gflops": round(gflops(torch.float32, args.size, args.seconds), 1),
        # bf16 at a smaller size: without AVX-512 BF16 / AMX it can be hundreds of times slower.
        "bf16_gflops": round(gflops(torch.bfloat16, min(args.size, 512), args.seconds), 1),
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
        "avx2": "avx2" in flags,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
