"""Speed and memory of one method's configuration on this machine: inference and training.

Uses the package's public API only (the same ``Detector.predict`` and ``Detector.fit`` that
``score`` and ``train`` run). Inference uses random weights (timing does not depend on them), so
architectures whose pretrained weights are not installed (EfficientNet-B5) can be timed too.
Prints one JSON object; run one job at a time on an otherwise idle machine.

    .venv/bin/python benchmarks/speed.py --method draem --profile cpu infer
    .venv/bin/python benchmarks/speed.py --method draem --profile paper --threads 2 infer --batch 1
    .venv/bin/python benchmarks/speed.py --method csflow --profile paper --set common.image_size=256 infer
    .venv/bin/python benchmarks/speed.py --method draem --profile cpu train --steps 20
    .venv/bin/python benchmarks/speed.py --method csflow --profile cpu train --epochs 3

``infer`` reports img/s at batch 1 and batched, p50/p95 batch-1 latency, GFLOP per image (counted
with torch.utils.flop_counter) and the GFLOP/s achieved. ``train`` runs ``fit`` on random images
for a short schedule and reports the training summary's throughput (first and later epochs).
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import measure  # benchmarks/timing.py: this script's folder is on sys.path
from torch.utils.flop_counter import FlopCounterMode

from surfaceinspect.config import build_run_config, deep_merge, parse_set_option
from surfaceinspect.detectors import TrainContext, get_detector_class
from surfaceinspect.device import configure_threads
from surfaceinspect.workflows.benchmark import peak_rss_mb


def build(args: argparse.Namespace, extra_sets: list[str]):
    cls = get_detector_class(args.method)
    layer: dict = {"common": {"device": "cpu", "threads": args.threads, "time_budget_min": 0}}
    for item in [*args.set, *extra_sets]:
        layer = deep_merge(layer, parse_set_option(item))
    run = build_run_config(cls.config_cls, args.profile, [layer])
    configure_threads(run.common.threads)
    return cls(run, torch.device("cpu")), run


def infer(args: argparse.Namespace) -> dict:
    det, run = build(args, [])
    det.init_random_weights()
    h, w = run.common.input_hw()
    batched = args.batch or run.common.batch_size
    x1, xb = torch.rand(1, 3, h, w), torch.rand(batched, 3, h, w)
    with FlopCounterMode(display=False) as counter:
        det.predict(x1)
    timing = measure(det.predict, x1, xb, args.seconds)
    gflop = counter.get_total_flops() / 1e9
    rate1, batched_rate = timing["images_per_s_batch1"], timing["images_per_s_batched"]
    return {
        "images_per_s_batch1": round(rate1, 3),
        f"images_per_s_batch{batched}": round(batched_rate, 3),
        "latency_ms_p50": round(timing["latency_ms_p50"], 2),
        "latency_ms_p95": round(timing["latency_ms_p95"], 2),
        "gflop_per_image": round(gflop, 3),
        "gflop_per_s_batch1": round(gflop * rate1, 1),
        f"gflop_per_s_batch{batched}": round(gflop * batched_rate, 1),
    }


def train(args: argparse.Namespace) -> dict:
    schedule = {"draem": [f"draem.steps={args.steps}"], "csflow": [f"csflow.epochs={args.epochs}"]}
    det, run = build(args, schedule.get(args.method, []))
    h, w = run.common.input_hw()
    n = args.images or max(4 * run.common.batch_size, 32)
    images = (torch.rand(n, 3, h, w) * 255).to(torch.uint8)
    summary = det.fit(images, TrainContext())
    return {
        "n_images": n,
        "steps": summary.steps,
        "epochs": summary.epochs,
        "seconds": summary.seconds,
        "images_per_s": summary.images_per_s,
        "images_per_s_first_epoch": summary.images_per_s_first_epoch,
        "images_per_s_later_epochs": summary.images_per_s_later_epochs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="override a setting, e.g. common.image_size=256")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    sub = ap.add_subparsers(dest="mode", required=True)
    p_infer = sub.add_parser("infer")
    p_infer.add_argument("--batch", type=int, default=0, help="batched measurement size (default: the profile's)")
    p_infer.add_argument("--seconds", type=float, default=10.0, help="measure each batch size for about this long")
    p_train = sub.add_parser("train")
    p_train.add_argument("--steps", type=int, default=20, help="DRAEM optimiser steps")
    p_train.add_argument("--epochs", type=int, default=3, help="CS-Flow epochs (the first includes features)")
    p_train.add_argument("--images", type=int, default=0, help="random training images (default: 4 batches)")
    args = ap.parse_args()
    result = infer(args) if args.mode == "infer" else train(args)
    print(
        json.dumps(
            {
                "method": args.method,
                "profile": args.profile,
                "sets": args.set,
                "mode": args.mode,
                **result,
                "peak_rss_mb": peak_rss_mb(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
