"""CS-Flow inference speed at the paper's architecture: surfaceinspect vs anomalib, same machine, same torch.

The paper's architecture (EfficientNet-B5 stage 6 features of the image at 3 scales, 4 coupling
blocks of width 1024), 256 px, random weights (timing does not depend on them, and nothing is
downloaded), ``--threads`` torch threads. surfaceinspect runs ``Detector.predict`` (what ``score``
runs); anomalib runs ``CsFlowModel`` in eval mode under ``torch.inference_mode`` (its predict
forward: features, flow, anomaly map and score). Each measurement is its own process, alternating
the two implementations ``--rounds`` times so that both see the same machine state; medians are
reported. anomalib lives in another environment (it pins other packages), given by
``--anomalib-python``:

    python -m venv /work/anomalib_venv && /work/anomalib_venv/bin/pip install -c constraints.txt anomalib==2.7.0
    .venv/bin/python benchmarks/vs_anomalib_csflow.py --anomalib-python /work/anomalib_venv/bin/python --threads 2

Prints one JSON object. ``--impl`` runs one measurement in this process (used by the driver).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def build_ours(size: int, sets: list[str]):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import build  # the detector construction of benchmarks/speed.py

    args = argparse.Namespace(method="csflow", profile="paper", threads=0, set=[f"common.image_size={size}", *sets])
    det, _ = build(args, [])
    det.init_random_weights()
    return lambda x: det.predict(x)


def build_anomalib(size: int):
    import torch
    import torchvision
    from anomalib.models.image.csflow import torch_model

    # Random B5 weights: the constructor would otherwise download ImageNet weights.
    torch_model.efficientnet_b5 = lambda weights=None: torchvision.models.efficientnet_b5(weights=None)
    model = torch_model.CsFlowModel(
        input_size=(size, size), cross_conv_hidden_channels=1024, n_coupling_blocks=4, clamp=3, num_channels=3
    ).eval()

    def run(x):
        with torch.inference_mode():
            return model(x)

    return run


def measure_one(impl: str, size: int, batch: int, seconds: float, threads: int, sets: list[str]) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from timing import measure  # no surfaceinspect import: runs in anomalib's environment too

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    run = build_ours(size, sets) if impl == "ours" else build_anomalib(size)
    torch.set_num_threads(threads)
    x1, xb = torch.rand(1, 3, size, size), torch.rand(batch, 3, size, size)
    timing = measure(run, x1, xb, seconds)
    return {
        "impl": impl,
        **{k: timing[k] for k in ("images_per_s_batch1", "images_per_s_batched", "latency_ms_p50")},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anomalib-python", default="", help="python of an environment with anomalib installed")
    ap.add_argument("--impl", choices=("ours", "anomalib"), help="measure one implementation in this process")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="a surfaceinspect setting for our side")
    args = ap.parse_args()
    if args.impl:
        print(json.dumps(measure_one(args.impl, args.size, args.batch, args.seconds, args.threads, args.set)))
        return
    if not args.anomalib_python:
        raise SystemExit("--anomalib-python is required (a python with anomalib installed)")
    common = ["--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads),
              "--seconds", str(args.seconds), *[a for s in args.set for a in ("--set", s)]]  # fmt: skip
    runs: dict[str, list[dict]] = {"ours": [], "anomalib": []}
    for _ in range(args.rounds):
        for impl, python in (("ours", sys.executable), ("anomalib", args.anomalib_python)):
            out = subprocess.run([python, __file__, "--impl", impl, *common], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{impl} failed:\n{out.stderr[-2000:]}")
            runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {
        impl: {
            key: round(statistics.median(r[key] for r in rs), 3)
            for key in ("images_per_s_batch1", "images_per_s_batched", "latency_ms_p50")
        }
        for impl, rs in runs.items()
    }
    for key in ("images_per_s_batch1", "images_per_s_batched"):
        summary[f"ours_vs_anomalib_{key}"] = round(summary["ours"][key] / summary["anomalib"][key], 3)
    print(json.dumps({"size": args.size, "batch": args.batch, "threads": args.threads, "sets": args.set,
                      "summary": summary, "runs": runs}))  # fmt: skip


if __name__ == "__main__":
    main()
