"""Train many DRAEM runs side by side and score each with several map filters and as ensembles.

A sweep for a lent GPU (or any machine with cores to spare): each run is a plain training as
``surfaceinspect benchmark`` does it (``engine.train`` on ``train/good``, calibration images held
out, the profile plus the run's ``--set`` items, ``common.seed=S``), then the whole ``test/`` folder
is scored once at the network size with the raw anomaly probability. From that one pass the image
AUROC is computed for every smoothing kernel in ``KERNELS`` (mean filter, then the maximum, as
``draem.smoothing_kernel`` does), and, at the end, for the ensembles of each setting's finished seeds
(every subset of 2 or more; the mean of their probability maps, as ``draem.members`` scores) into
``OUT/ensembles.json``. Results are appended to ``OUT/results.jsonl`` as each run finishes, so a
sweep stopped early keeps what it measured (``--deadline-s`` starts no run after that time;
``--ensembles-only`` recomputes the ensembles from the saved maps). Runs start seed by seed: the
first seed of every setting, then the second, and so on.

    python benchmarks/draem_sweep.py plan.yaml --out OUT --jobs 6 --device cuda

``plan.yaml``::

    profile: cpu
    sets: [common.time_budget_min=0, common.threads=1]   # every run
    runs:
      - {name: w8-16, data: gpudata/mtd, seeds: [0, 1, 2], sets: [draem.recon_width=8, draem.disc_width=16]}
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

KERNELS = (1, 3, 5, 11, 21, 31)


def _filtered_scores(prob: np.ndarray, kernels: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Image scores of raw probability maps ``(N, H, W)`` for each kernel, as DRAEM's inference makes them."""
    import torch

    from surfaceinspect.detectors.draem.detector import smoothed_max

    t = torch.from_numpy(prob)[:, None]
    return {k: smoothed_max(t, k)[0].numpy() for k in kernels}


def _aurocs(labels: np.ndarray, types: list[str], scores: dict[int, np.ndarray]) -> dict[str, Any]:
    from surfaceinspect.analysis import metrics

    result: dict[str, Any] = {}
    good = [i for i, t in enumerate(types) if t == "good"]
    for k, s in scores.items():
        per_type = {}
        for t in sorted(set(types) - {"good"}):
            idx = good + [i for i, tt in enumerate(types) if tt == t]
            per_type[t] = round(metrics.image_auroc(labels[idx], s[idx]), 4)
        result[f"k{k}"] = {"image_auroc": round(metrics.image_auroc(labels, s), 4), "per_type": per_type}
    return result


def run_one(args: argparse.Namespace) -> None:
    """Child process: train one run, score the test set, save raw maps and a result line."""
    import torch

    from surfaceinspect import engine
    from surfaceinspect.data.datasets import load_mvtec
    from surfaceinspect.data.streaming import iterate_images, stack_images
    from surfaceinspect.profiles import resolve_run_config
    from surfaceinspect.ui import Reporter

    ds = load_mvtec(args.data, check_mask_sizes=False)
    run_config = resolve_run_config(
        method="draem",
        profile=args.profile,
        config_file=None,
        common_flags={"device": args.device},
        sets=[*args.set, f"common.seed={args.seed}"],
    )
    started = time.monotonic()
    result = engine.train(
        Path(args.data), run_config, reporter=Reporter(quiet=True), run_dir=Path(args.run_dir), files=ds.train_good
    )
    train_s = time.monotonic() - started
    # kernel 1: the raw probabilities; the filters are applied below
    model = engine.load(
        Path(args.run_dir), device=args.device, inference_sets=["draem.smoothing_kernel=1"], runtime="torch"
    )
    detector = model.detector
    common = detector.run_config.common
    samples = ds.test
    maps = []
    for batch in iterate_images([s.path for s in samples], common.input_hw(), 16, 2):
        maps.append(detector.predict_arrays(stack_images(batch))[1])
    prob = np.concatenate(maps)
    np.save(args.maps, prob)
    labels = np.array([s.is_anomalous for s in samples])
    types = [s.defect_type for s in samples]
    line = {
        "name": args.name,
        "data": Path(args.data).name,
        "seed": args.seed,
        "sets": args.set,
        "train_s": round(train_s, 1),
        "steps": result.summary.get("steps"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        **_aurocs(labels, types, _filtered_scores(prob, KERNELS)),
    }
    print(json.dumps(line))


def _ensembles(out: Path, work: Path, plan: dict[str, Any], kernels: tuple[int, ...]) -> None:
    from surfaceinspect.data.datasets import load_mvtec

    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    results = []
    for run in plan["runs"]:
        done = [x["seed"] for x in lines if x["name"] == run["name"] and "error" not in x]
        if len(done) < 2:
            continue
        ds = load_mvtec(run["data"], check_mask_sizes=False)
        labels = np.array([s.is_anomalous for s in ds.test])
        types = [s.defect_type for s in ds.test]
        maps = {s: np.load(work / f"{run['name']}-seed{s}.npy") for s in done}
        for size in range(2, len(done) + 1):
            subsets = list(itertools.combinations(sorted(done), size))
            per_subset = [
                _aurocs(labels, types, _filtered_scores(np.mean([maps[s] for s in sub], axis=0), kernels))
                for sub in subsets
            ]
            results.append(
                {
                    "name": run["name"],
                    "members": size,
                    "subsets": [list(s) for s in subsets],
                    **{
                        f"k{k}": round(float(np.mean([p[f"k{k}"]["image_auroc"] for p in per_subset])), 4)
                        for k in kernels
                    },
                }
            )
    (out / "ensembles.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", nargs="?", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="run folders and raw maps (default OUT/work)")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--deadline-s", type=float, default=0, help="start no run after this many seconds")
    parser.add_argument("--ensembles-only", action="store_true", help="only (re)compute OUT/ensembles.json")
    # one run (internal)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="")
    parser.add_argument("--data", default="")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--maps", default="")
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    if args.plan is None or not args.plan.is_file():
        parser.error(f"plan file not found: {args.plan}; pass a plan YAML (see the module docstring)")
    plan = yaml.safe_load(args.plan.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    if args.ensembles_only:
        _ensembles(args.out, work, plan, KERNELS)
        return
    if results.exists():
        raise SystemExit(f"{results} exists: choose a new --out folder (a sweep appends its results)")
    started = time.monotonic()
    # first seeds of every setting first (a stable sort keeps the plan's order within a rank)
    ranked = [(rank, run, seed) for run in plan["runs"] for rank, seed in enumerate(run["seeds"])]
    jobs = [(run, seed) for _, run, seed in sorted(ranked, key=lambda job: job[0])]

    def launch(job: tuple[dict[str, Any], int]) -> None:
        run, seed = job
        if args.deadline_s and time.monotonic() - started > args.deadline_s:
            return
        tag = f"{run['name']}-seed{seed}"
        cmd = [sys.executable, __file__, "--out", str(args.out), "--one", "--name", run["name"], "--data", run["data"]]
        cmd += [
            "--profile",
            run.get("profile", plan.get("profile", "cpu")),
            "--seed",
            str(seed),
            "--device",
            args.device,
        ]
        for item in [*plan.get("sets", []), *run.get("sets", [])]:
            cmd += ["--set", item]
        cmd += ["--run-dir", str(work / tag), "--maps", str(work / f"{tag}.npy")]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
        if line is None:
            err = {"name": run["name"], "seed": seed, "error": proc.stderr.strip().splitlines()[-3:]}
            line = json.dumps(err)
        with results.open("a") as fh:
            fh.write(line + "\n")
        print(
            f"[{time.monotonic() - started:6.0f}s] {tag} done in {time.monotonic() - t0:.0f}s: {line[:300]}", flush=True
        )

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(launch, jobs))
    _ensembles(args.out, work, plan, KERNELS)


if __name__ == "__main__":
    main()
