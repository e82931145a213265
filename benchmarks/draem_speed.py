"""DRAEM CPU speed: inference (eager vs fused/channels_last vs bf16) and training steps + peak RSS.

Each mode runs in its own process so peak RSS belongs to that mode alone:

    .venv/bin/python benchmarks/draem_speed.py infer --size 256 --widths 128 64 --iters 5
    .venv/bin/python benchmarks/draem_speed.py train --size 256 --widths 128 64 --batch 8 --steps 3
    .venv/bin/python benchmarks/draem_speed.py train --size 128 --widths 16 8 --batch 8 --steps 10

Training steps use real synthesis (DataLoader with the configured workers) and the full loss,
exactly as DraemDetector.fit runs them (it is called with a fixed number of steps).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from draem_common import peak_rss_gb

from surfaceinspect.config import CommonConfig, RunConfig
from surfaceinspect.detectors.base import TrainContext, TrainProgress
from surfaceinspect.detectors.draem import DraemConfig, DraemDetector


def run_config(args: argparse.Namespace, **extra: object) -> RunConfig:
    cfg = DraemConfig(recon_width=args.widths[0], disc_width=args.widths[1], **extra)
    common = CommonConfig(image_size=args.size, batch_size=args.batch, workers=args.workers, threads=args.threads)
    run = RunConfig("draem", "bench", common, cfg)
    run.validate()
    return run


def time_predict(det: DraemDetector, x: torch.Tensor, iters: int) -> tuple[float, torch.Tensor]:
    det.predict(x)  # warm-up: oneDNN primitive creation, fusion
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        scores = det.predict(x).scores
        times.append(time.perf_counter() - t)
    return min(times), scores


def infer(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size)
    out: dict = {"mode": "infer", "size": args.size, "widths": args.widths, "batch": args.batch}
    base = DraemDetector(run_config(args, fuse_bn=False), torch.device("cpu"))
    weights = base.state_dict()
    variants = {"fused+channels_last fp32": {}, "fused+channels_last bf16": {"inference_bf16": True}}
    if not args.skip_eager:
        # Reference: plain eager model, NCHW, BatchNorm unfused (what a straightforward port runs).
        model = base.model.eval()
        with torch.inference_mode():
            model(x)
            t = time.perf_counter()
            for _ in range(args.iters):
                model(x)
        out["eager fp32 img/s"] = round(args.batch * args.iters / (time.perf_counter() - t), 3)
    ref_scores = None
    for name, kw in variants.items():
        det = DraemDetector(run_config(args, **kw), torch.device("cpu"))
        det.load_state_dict(weights)
        best, scores = time_predict(det, x, args.iters)
        out[f"{name} img/s"] = round(args.batch / best, 3)
        if ref_scores is None:
            ref_scores = scores
        else:
            out["bf16 max |score diff| (untrained weights)"] = float((scores - ref_scores).abs().max())
    out["peak_rss_gb"] = round(peak_rss_gb(), 2)
    out["threads"] = torch.get_num_threads()
    return out


def train(args: argparse.Namespace) -> dict:
    det = DraemDetector(
        run_config(args, steps=args.steps, activation_checkpointing=args.checkpointing), torch.device("cpu")
    )
    marks: list[float] = []

    def on_progress(p: TrainProgress) -> None:
        marks.append(time.perf_counter())

    n = max(args.batch * 4, 32)
    images = (torch.rand(n, 3, args.size, args.size) * 255).to(torch.uint8)
    summary = det.fit(images, TrainContext(on_progress=on_progress))
    step_times = [b - a for a, b in itertools.pairwise(marks)]  # marks[0] = the step-0 report
    steady = step_times[1:] or step_times  # drop the first step (one-off costs)
    return {
        "mode": "train",
        "size": args.size,
        "widths": args.widths,
        "batch": args.batch,
        "workers": args.workers,
        "activation_checkpointing": args.checkpointing,
        "step_s": [round(t, 2) for t in step_times],
        "train img/s (median steady step)": round(args.batch / sorted(steady)[len(steady) // 2], 3),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "threads": torch.get_num_threads(),
        "summary_seconds": summary["seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["infer", "train"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--widths", type=int, nargs=2, default=[128, 64])
    ap.add_argument("--batch", type=int, default=None, help="default: 1 for infer, 8 for train")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--checkpointing", action="store_true", help="train: draem.activation_checkpointing=true")
    args = ap.parse_args()
    if args.batch is None:
        args.batch = 1 if args.mode == "infer" else 8
    result = infer(args) if args.mode == "infer" else train(args)
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
