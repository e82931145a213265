"""Run several DRAEM trainings (draem_eval.py) side by side and print a markdown table.

Each experiment is a name plus ``--set`` overrides on top of a base profile. Used for the choice of
the built-in anomaly source and of the cpu profile (BENCHMARKS.md, sections 3 and 5), e.g.

    .venv/bin/python benchmarks/draem_ablation.py --set sources --jobs 2 --out /tmp/draem_abl
    python3 benchmarks/draem_ablation.py --set sources --device cuda --jobs 4 --cache-dir .draem_cache
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = HERE.parent / "sample_configs" / "draem-cpu.yaml"

EXPERIMENTS: dict[str, list[tuple[str, list[str]]]] = {
    "sources": [
        ("fractal", ["draem.anomaly_source=fractal"]),
        ("structured", ["draem.anomaly_source=structured"]),
        ("self", ["draem.anomaly_source=self"]),
        ("fractal, colour kept", ["draem.anomaly_source=fractal", "draem.match_grayscale=false"]),
    ],
    "seeds": [
        (f"{src} seed {seed}", [f"draem.anomaly_source={src}", f"common.seed={seed}"])
        for src in ("fractal", "structured", "self")
        for seed in (1, 2)
    ],
    "capacity": [
        ("w16/8 steps x1", []),
        ("w16/8 steps x2", ["draem.steps=2400"]),
        ("w32/16 steps x1", ["draem.recon_width=32", "draem.disc_width=16"]),
        ("w16/8 160px", ["common.image_size=160"]),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="which", choices=sorted(EXPERIMENTS), default="sources")
    ap.add_argument("--data", default="mtd")
    ap.add_argument("--profile", type=Path, default=BASE)
    ap.add_argument("--extra", action="append", default=[], help="section.key=value added to every experiment")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/draem_ablation"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    pending = list(enumerate(EXPERIMENTS[args.which]))
    running: list[tuple[int, str, subprocess.Popen, Path]] = []
    results: dict[int, tuple[str, dict]] = {}
    t0 = time.monotonic()
    while pending or running:
        while pending and len(running) < args.jobs:
            i, (name, sets) = pending.pop(0)
            out = args.out / f"{args.which}_{i}.json"
            cmd = [sys.executable, str(HERE / "draem_eval.py"), "--data", args.data, "--profile", str(args.profile)]
            cmd += ["--device", args.device, "--out", str(out)]
            if args.cache_dir:
                cmd += ["--cache-dir", str(args.cache_dir)]
            for s in [*args.extra, *sets]:
                cmd += ["--set", s]
            log = open(args.out / f"{args.which}_{i}.log", "w")  # noqa: SIM115 - closed with the process
            running.append((i, name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out))
        time.sleep(2)
        for item in list(running):
            i, name, proc, out = item
            if proc.poll() is not None:
                running.remove(item)
                res = json.loads(out.read_text()) if out.is_file() else {"error": f"exit {proc.returncode}"}
                results[i] = (name, res)
                print(f"[{time.monotonic() - t0:.0f}s] {name}: {res.get('metrics', res)}", flush=True)

    print("\n| experiment | image AUROC | pixel AUROC | steps | train s |\n|---|---|---|---|---|")
    for i in sorted(results):
        name, res = results[i]
        m, s = res.get("metrics", {}), res.get("summary", {})
        print(
            f"| {name} | {m.get('image_auroc', float('nan')):.3f} | {m.get('pixel_auroc', float('nan')):.3f} "
            f"| {s.get('steps', '-')} | {s.get('seconds', '-')} |"
        )


if __name__ == "__main__":
    main()
