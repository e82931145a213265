"""Score a trained DRAEM run with several anomaly-map smoothing sizes (no retraining).

The paper smooths the map with a 21x21 mean filter at 256 px; at another network size the same
footprint is a different filter. This re-scores a run's test split with each ``--kernels`` size:

    surfaceinspect benchmark ../shared/data/mtd --method draem --profile cpu --keep-models /tmp/kept --out /tmp/b
    .venv/bin/python benchmarks/draem_kernels.py /tmp/kept/mtd-draem --data mtd --kernels 21 11 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from draem_common import CACHE, evaluate, load_split

from surfaceinspect import engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--data", choices=["mtd", "bottle"], default="mtd")
    ap.add_argument("--kernels", type=int, nargs="+", default=[21, 11, 5])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=CACHE)
    args = ap.parse_args()
    model = engine.load(args.run_dir, device="cpu", threads=args.threads)
    det = model.detector
    split = load_split(args.data, det.run_config.common.image_size, args.cache_dir)
    results = {}
    for k in args.kernels:
        det.cfg.smoothing_kernel = k
        results[k] = evaluate(det, split)
        print(json.dumps({"kernel": k, **results[k]}), flush=True)


if __name__ == "__main__":
    main()
