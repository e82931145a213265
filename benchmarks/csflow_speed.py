"""CS-Flow CPU speed and memory: inference img/s (batch 1 and 8), training img/s on cached features, peak RSS.

Random weights are used (timing does not depend on them), so the paper's EfficientNet-B5 architecture
can be timed without its weights file. Each mode runs in its own process so the peak RSS belongs to it:

    .venv/bin/python benchmarks/csflow_speed.py --mode infer --batch 1   # B5-sized, 256 px
    .venv/bin/python benchmarks/csflow_speed.py --mode infer --batch 8
    .venv/bin/python benchmarks/csflow_speed.py --mode train --batch 16
    .venv/bin/python benchmarks/csflow_speed.py --profile cpu --mode infer --batch 1   # shipped cpu profile

Training speed is what epochs after the first cost: features come from the in-memory cache, so only
the flow runs (forward, backward, clip, Adam step).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from csflow_common import peak_rss_gb

from surfaceinspect.config import CommonConfig, RunConfig, build_run_config
from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.detectors.csflow import CSFlowConfig, CSFlowDetector
from surfaceinspect.detectors.csflow.detector import FeatureStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["infer", "train"], required=True)
    ap.add_argument("--profile", default="", help="time a shipped profile (e.g. cpu) instead of the B5 architecture")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_b5")
    ap.add_argument("--stage", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0, help="measure for about this long")
    ap.add_argument("--no-channels-last", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.profile:
        run = build_run_config(CSFlowConfig, args.profile, [])
        run.common.batch_size = args.batch
        size = run.common.image_size
    else:  # default: the paper's architecture (EfficientNet-B5 stage 6, width 1024, 4 blocks) at --size
        size = args.size
        cfg = CSFlowConfig(backbone=args.backbone, feature_stage=args.stage, hidden_channels=args.hidden)
        common = CommonConfig(image_size=size, batch_size=args.batch, threads=args.threads)
        run = RunConfig("csflow", "custom", common, cfg)
        run.validate()
    run.method_config.channels_last = not args.no_channels_last
    det = CSFlowDetector(run, torch.device("cpu"))
    det._build(pretrained=False)
    assert det.flow is not None and det.extractor is not None
    n_params = sum(p.numel() for p in det.flow.parameters())

    x = torch.rand(args.batch, 3, size, size)
    if args.mode == "infer":
        det.flow.eval()
        det.predict(x)  # warm-up (allocations, oneDNN kernel selection)
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds or done < 3 * args.batch:
            det.predict(x)
            done += args.batch
        rate = done / (time.perf_counter() - t0)
    else:
        with torch.inference_mode():
            feats = [f.clone() for f in det.extractor(x)]
        n = args.batch * 4
        arrays = [f.repeat(4, 1, 1, 1).clone() for f in feats]
        store = FeatureStore.from_arrays(arrays, torch.device("cpu"))
        run.method_config.epochs = 1
        det._train(store, n, args.batch, TrainContext())  # warm-up epoch
        times = []
        t_end = time.perf_counter() + args.seconds
        while time.perf_counter() < t_end or len(times) < 2:
            t0 = time.perf_counter()
            det._train(store, n, args.batch, TrainContext())
            times.append(time.perf_counter() - t0)
        rate = n / (sum(times) / len(times))
    print(
        json.dumps(
            {
                "mode": args.mode,
                "profile": args.profile or "custom",
                "backbone": run.method_config.backbone,
                "size": size,
                "hidden": run.method_config.hidden_channels,
                "flow_params_M": round(n_params / 1e6, 1),
                "batch": args.batch,
                "threads": args.threads,
                "channels_last": run.method_config.channels_last,
                "img_per_s": round(rate, 2),
                "peak_rss_gb": round(peak_rss_gb(), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
