"""Train DRAEM on a dataset's train/good images and report image / pixel AUROC on its test split.

Examples (rerunnable; the split cache lives in /tmp/draem_bench_cache unless --cache-dir is given):

    .venv/bin/python benchmarks/draem_eval.py --data mtd --profile sample_configs/draem-cpu.yaml
    .venv/bin/python benchmarks/draem_eval.py --data mtd --size 128 --set draem.steps=2000 \
        --set draem.anomaly_source=structured --out /tmp/abl_structured.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from draem_common import CACHE, evaluate, load_split, make_run_config, peak_rss_gb, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["mtd", "bottle"], default="mtd")
    ap.add_argument("--profile", type=Path, default=None, help="profile YAML (e.g. sample_configs/draem-cpu.yaml)")
    ap.add_argument("--size", type=int, default=None, help="override common.image_size")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args()

    overrides = list(args.overrides)
    if args.size is not None:
        overrides.append(f"common.image_size={args.size}")
    run = make_run_config(args.profile, overrides)
    size = run.common.image_size
    t0 = time.monotonic()
    split = load_split(args.data, size, args.cache_dir)
    print(
        f"{args.data}: {len(split['train'])} train, {len(split['test'])} test at {size}px "
        f"({time.monotonic() - t0:.0f}s to load)",
        flush=True,
    )
    det, summary = train(run, split["train"], args.device)
    metrics = evaluate(det, split)
    result = {
        "data": args.data,
        "profile": run.profile,
        "overrides": args.overrides,
        "config": run.to_dict(),
        "summary": summary,
        "metrics": metrics,
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps({"summary": summary, "metrics": metrics}, indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
