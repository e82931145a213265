"""End-to-end CS-Flow accuracy and time with a shipped profile: fit on train/good, score test/.

Uses CSFlowDetector.fit/predict exactly as the engine does (features extracted inside fit, so the
reported training time includes feature extraction). All training images are used (no calibration
split). Prints one JSON line and appends it to ``--out``.

    .venv/bin/python benchmarks/csflow_eval.py --data mtd --profile cpu
    .venv/bin/python benchmarks/csflow_eval.py --data bottle --profile cpu
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from csflow_common import image_auroc, load_split, peak_rss_gb, pixel_auroc_at_original_size

from surfaceinspect.config import build_run_config, parse_set_option
from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.detectors.csflow import CSFlowConfig, CSFlowDetector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["mtd", "bottle"], default="mtd")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. --set csflow.epochs=10")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default="/tmp/csflow_eval.jsonl")
    args = ap.parse_args()
    layers = [parse_set_option(s) for s in args.set] + [{"common": {"threads": args.threads}}]
    run = build_run_config(CSFlowConfig, args.profile, layers)
    size = run.common.image_size
    data = load_split(args.data, size)
    det = CSFlowDetector(run, torch.device(args.device))
    last = {}

    def on_progress(p) -> None:
        if p.phase != last.get("phase"):
            print(f"{time.strftime('%H:%M:%S')} phase {p.phase} ({p.total} steps)", flush=True)
        last["phase"] = p.phase

    t0 = time.monotonic()
    summary = det.fit(data["train"], TrainContext(on_progress=on_progress))
    fit_s = time.monotonic() - t0
    scores, maps = [], []
    t1 = time.monotonic()
    test = data["test"]
    for i in range(0, len(test), 8):
        pred = det.predict(test[i : i + 8].float() / 255)
        scores.append(pred.scores)
        maps.append(pred.maps)
    predict_s = time.monotonic() - t1
    img = image_auroc(data["labels"], torch.cat(scores).numpy())
    pix = pixel_auroc_at_original_size(torch.cat(maps), data["masks"]) if data["masks"] is not None else None
    result = {
        "data": args.data,
        "profile": args.profile,
        "set": args.set,
        "image_size": size,
        "n_train": len(data["train"]),
        "n_test": len(test),
        "image_auroc": round(img, 4),
        "pixel_auroc": None if pix is None else round(pix, 4),
        "fit_s_incl_features": round(fit_s, 1),
        "predict_img_per_s_batch8": round(len(test) / predict_s, 2),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "threads": args.threads,
        "device": args.device,
        "summary": summary,
    }
    print(json.dumps(result), flush=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
