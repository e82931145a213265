"""Cheap probe to choose CS-Flow's backbone, stage and image size before training any flow.

For each stage, fits one Gaussian per scale (channel mean and full covariance pooled over positions)
to training features and scores test images by the mean Mahalanobis distance over positions and
scales. A flow is a far richer density model, but features that a Gaussian cannot separate at all
rarely become good with a few CPU epochs. Subsets keep it cheap on a shared CPU.

    .venv/bin/python benchmarks/csflow_layer_probe.py --data mtd --size 256 --backbone efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from csflow_common import image_auroc, load_split

from surfaceinspect.detectors.csflow import backbones as bb


def stage_outputs(
    trunk: torch.nn.Module, x: torch.Tensor, stages: list[int], ends: list[int]
) -> dict[int, torch.Tensor]:
    out = {}
    h = F.relu6(trunk._bn0(trunk._conv_stem(x)))
    for i, block in enumerate(trunk._blocks):
        h = block(h)
        for s in stages:
            if ends[s - 1] == i:
                out[s] = h
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mtd")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--stages", default="4,5,6")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test-good", type=int, default=100)
    ap.add_argument("--n-test-bad", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/csflow_probe.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stages = [int(s) for s in args.stages.split(",")]
    data = load_split(args.data, args.size)
    rng = np.random.default_rng(0)
    train_idx = rng.choice(len(data["train"]), min(args.n_train, len(data["train"])), replace=False)
    labels = data["labels"]
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels == 1)
    good = rng.choice(good, min(args.n_test_good, len(good)), replace=False)
    bad = rng.choice(bad, min(args.n_test_bad, len(bad)), replace=False)
    test_idx = np.concatenate([good, bad])
    y = labels[test_idx]

    width, depth = bb._LITE_MULTIPLIERS[args.backbone]
    model = bb.build_lite(args.backbone).eval()
    spec = bb.BACKBONES[args.backbone]
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def extract(images: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        feats: dict[tuple[int, int], list[torch.Tensor]] = {}
        with torch.inference_mode():
            for i in range(0, len(images), 16):
                x = (images[i : i + 16].float() / 255 - mean) / std
                for sc in range(3):
                    xs = x if sc == 0 else F.interpolate(x, scale_factor=0.5**sc, mode="bilinear", antialias=True)
                    for st, f in stage_outputs(model, xs, stages, model.stage_ends).items():
                        feats.setdefault((st, sc), []).append(f.clone())
        return {k: torch.cat(v) for k, v in feats.items()}

    t0 = time.monotonic()
    tr = extract(data["train"][torch.from_numpy(train_idx)])
    te = extract(data["test"][torch.from_numpy(test_idx)])
    extract_s = time.monotonic() - t0
    for st in stages:
        total = 0
        per_scale = {}
        for sc in range(3):
            a = tr[(st, sc)].permute(0, 2, 3, 1).reshape(-1, tr[(st, sc)].shape[1]).double()
            mu = a.mean(0)
            cov = torch.cov(a.T) + 0.01 * torch.eye(a.shape[1], dtype=torch.float64)
            inv = torch.linalg.inv(cov)
            b = te[(st, sc)].permute(0, 2, 3, 1).double() - mu
            d = torch.einsum("bhwc,cd,bhwd->bhw", b, inv, b)
            s = d.flatten(1).mean(1)
            per_scale[sc] = round(image_auroc(y, s.numpy()), 4)
            total = total + s / a.shape[1]
        res = {
            "data": args.data,
            "size": args.size,
            "backbone": args.backbone,
            "stage": st,
            "channels": spec.channels(st),
            "map": list(te[(st, 0)].shape[-2:]),
            "auroc_all_scales": round(image_auroc(y, total.numpy()), 4),
            "auroc_per_scale": per_scale,
            "n_train": len(train_idx),
            "n_test": len(test_idx),
            "extract_s": round(extract_s, 1),
        }
        print(json.dumps(res), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(res) + "\n")
    del width, depth


if __name__ == "__main__":
    main()
