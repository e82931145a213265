"""Sweep CS-Flow settings on real data: image AUROC along training, pixel AUROC at the end.

Features of the train and test images are extracted once per (data, size, backbone, stage) and
cached under /tmp/csflow_bench_cache, then the detector's own training loop (CSFlowDetector._train)
runs on them; every ``--eval-every`` epochs the test set is scored with the detector's scoring code.
One JSON line per run is appended to ``--out``.

Example:
    .venv/bin/python benchmarks/csflow_sweep.py --data mtd --size 256 --backbone efficientnet_lite0 \
        --stage 6 --hidden 128 --epochs 20 --eval-every 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from csflow_common import CACHE, image_auroc, load_split, pixel_auroc_at_original_size

from surfaceinspect.config import CommonConfig, RunConfig, parse_set_option
from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.detectors.csflow import CSFlowConfig, CSFlowDetector
from surfaceinspect.detectors.csflow.detector import FeatureStore, channel_statistics


def features(det: CSFlowDetector, images: torch.Tensor, key: str) -> tuple[list[torch.Tensor], float]:
    path = CACHE / f"feat_{key}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["arrays"], float(saved["seconds"])
    assert det.extractor is not None
    t0 = time.monotonic()
    store = FeatureStore(det.extractor, images, "memory", 32, det.device)
    seconds = time.monotonic() - t0
    torch.save({"arrays": store.arrays, "seconds": seconds}, path)
    return store.arrays, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["mtd", "bottle"], default="mtd")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--stage", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="other csflow settings, e.g. --set clamp=2")
    ap.add_argument("--out", default="/tmp/csflow_sweep.jsonl")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    extra: dict = {}
    for item in args.set:
        extra.update(parse_set_option(item))
    cfg = CSFlowConfig(
        epochs=args.epochs, backbone=args.backbone, feature_stage=args.stage, hidden_channels=args.hidden, **extra
    )
    common = CommonConfig(image_size=args.size, batch_size=args.batch, seed=0, threads=args.threads)
    cfg.validate(common)
    det = CSFlowDetector(RunConfig("csflow", "sweep", common, cfg), torch.device("cpu"))
    det._build(pretrained=True)
    data = load_split(args.data, args.size)
    key = f"{args.data}_{args.size}_{args.backbone}_s{args.stage}_{cfg.downscale_mode}"
    train_feats, train_feat_s = features(det, data["train"], key + "_train")
    test_feats, _ = features(det, data["test"], key + "_test")
    n = len(data["train"])
    train_store = FeatureStore.from_arrays(train_feats, det.device)
    if cfg.feature_norm == "channel":
        det.norm = channel_statistics(train_store, n, 64, det.device)
    steps_per_epoch = -(-n // min(args.batch, n))

    def evaluate(with_maps: bool) -> tuple[float, float | None]:
        scores, maps = [], []
        with torch.inference_mode():
            for i in range(0, len(data["test"]), 32):
                zs, _ = det.flow(det._layout([f[i : i + 32] for f in test_feats]))
                pred = det.prediction_from_latents(zs, args.size)
                scores.append(pred.scores)
                if with_maps:
                    maps.append(pred.maps)
        img = image_auroc(data["labels"], torch.cat(scores).numpy())
        pix = None
        if with_maps and data["masks"] is not None:
            pix = pixel_auroc_at_original_size(torch.cat(maps), data["masks"])
        return img, pix

    curve = []
    t_train = time.monotonic()
    eval_s = 0.0

    def on_progress(p) -> None:
        nonlocal eval_s
        if p.phase == "train" and p.step % steps_per_epoch == 0:
            epoch = p.step // steps_per_epoch
            if epoch % args.eval_every == 0 and epoch < args.epochs:
                t = time.monotonic()
                auroc, _ = evaluate(False)
                eval_s += time.monotonic() - t
                elapsed = time.monotonic() - t_train - eval_s
                curve.append((epoch, round(auroc, 4), round(elapsed, 1)))
                print(f"epoch {epoch}: image AUROC {auroc:.4f}  loss {p.loss:.3f}  train {elapsed:.0f}s", flush=True)

    summary = det._train(train_store, n, min(args.batch, n), TrainContext(on_progress))
    train_s = time.monotonic() - t_train - eval_s
    img, pix = evaluate(True)
    curve.append((args.epochs, round(img, 4), round(train_s, 1)))
    result = {
        "data": args.data,
        "size": args.size,
        "backbone": args.backbone,
        "stage": args.stage,
        "hidden": args.hidden,
        "epochs": args.epochs,
        "batch": args.batch,
        "set": extra,
        "image_auroc": round(img, 4),
        "pixel_auroc": None if pix is None else round(pix, 4),
        "curve": curve,
        "train_feature_s": round(train_feat_s, 1),
        "train_s": round(train_s, 1),
        "train_img_per_s": summary["train_images_per_s"],
        "final_loss": summary["final_loss"],
        "threads": args.threads,
    }
    print(json.dumps(result), flush=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
