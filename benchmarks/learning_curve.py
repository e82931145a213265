"""Accuracy against CPU minutes of one DRAEM training: the learning curve of a profile.

Trains once with ``surfaceinspect benchmark`` (keeping the model and its report), copies every
resumable checkpoint the training writes (one per ``--every-s`` seconds of training) and scores each
copy's weights on the test set as the finished run scores (its map filter and score): image AUROC and
AP per snapshot. Writes ``OUT/curve.json`` and ``OUT/curve.md``, with the finished run's full benchmark
accuracy (pixel AUROC, AUPRO too) as the last row. The x axis is the training's own clock (the time a
checkpoint records), so the first snapshots include reading the images and the first, slower epoch.

    .venv/bin/python benchmarks/learning_curve.py ../shared/data/mtd --profile cpu --seed 0 \\
        --set common.time_budget_min=0 --out curves/mtd-cpu-s0

``--score-only`` skips the training and scores the snapshots already in ``OUT`` (after an interruption).
Run it alone on the machine: the snapshots' minutes are the training's own clock.

With ``draem.members: K`` (an ensemble, models trained one after another) a snapshot taken while
model i trains is scored as the ensemble of models 1..i, the untrained ones left out; its ``step``
counts the steps of all models so far, and ``model`` says which one was training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from surfaceinspect.analysis import metrics
from surfaceinspect.data.datasets import load_mvtec
from surfaceinspect.data.streaming import iterate_images
from surfaceinspect.data.tiling import TiledPredictor
from surfaceinspect.detectors.draem.networks import DraemEnsemble
from surfaceinspect.engine import predict_items
from surfaceinspect.storage.modeldir import CHECKPOINT_FILE, METADATA_FILE, load_model

CLI = [sys.executable, "-m", "surfaceinspect"]


def train_with_snapshots(args: argparse.Namespace, out: Path) -> None:
    """Run the benchmark's training and copy each new checkpoint into ``out/snapshots``."""
    snapshots = out / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    cmd = [
        *CLI,
        "benchmark",
        str(args.data),
        "-m",
        "draem",
        "-p",
        args.profile,
        "--seed",
        str(args.seed),
        "-q",
        "--keep-models",
        str(out / "kept"),
        "--out",
        str(out / "final"),
        "--set",
        f"common.checkpoint_every_s={args.every_s}",
    ]
    for item in args.set:
        cmd += ["--set", item]
    print(" ".join(cmd), flush=True)
    # Own process group: stopping this script with Ctrl-C or kill stops the training's workers too.
    proc = subprocess.Popen(cmd, start_new_session=True)
    seen: float | None = None
    try:
        while True:
            done = proc.poll() is not None
            for ckpt in (out / "kept").glob(f"*/{CHECKPOINT_FILE}"):
                try:
                    mtime = ckpt.stat().st_mtime
                    if mtime != seen:
                        # The checkpoint is replaced atomically, so a copy is always a whole file.
                        shutil.copyfile(ckpt, snapshots / f"ckpt_{time.time_ns()}.pt")
                        seen = mtime
                except FileNotFoundError:  # the finished run has just removed its checkpoint
                    pass
            if done:
                break
            time.sleep(args.poll_s)
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    if proc.returncode != 0:
        raise SystemExit(f"training benchmark failed with exit code {proc.returncode}")


@dataclass
class Snapshot:
    """One checkpoint's weights and where in the training it was taken."""

    member: int  # index of the ensemble model that was training (0 without draem.members)
    step: int  # steps of all models so far
    seconds: float  # the training's own clock
    weights: dict[str, torch.Tensor]


def snapshot_states(out: Path) -> list[Snapshot]:
    """The snapshots, one per distinct (model, step), in training order."""
    states: dict[tuple[int, int], Snapshot] = {}
    for ckpt in sorted((out / "snapshots").glob("ckpt_*.pt")):
        raw = torch.load(ckpt, weights_only=True)
        state = raw["detector_state"]
        member = int(state.get("member", 0))
        step = sum(int(v) for v in state.get("members_done", [])) + int(state["step"])
        states.setdefault((member, step), Snapshot(member, step, float(raw["train_seconds"]), state["model"]))
    return [states[k] for k in sorted(states)]


def trained_part(model: torch.nn.Module, member: int) -> torch.nn.Module:
    """The models of an ensemble trained by the time model ``member`` trains (the whole model otherwise)."""
    if not isinstance(model, DraemEnsemble):
        return model
    return model.members[0] if member == 0 else DraemEnsemble(list(model.members[: member + 1]))


def score_snapshots(data: Path, out: Path) -> list[dict]:
    """Image AUROC (and AP) on the test set for every snapshot, scored as the finished run scores.

    The test images are read once and kept decoded: only the weights change between snapshots.
    """
    (final,) = [p.parent for p in (out / "kept").glob(f"*/{METADATA_FILE}")]
    detector, _ = load_model(final, torch.device("cpu"))
    tiling = detector.run_config.common.tiling
    samples = load_mvtec(data).test
    labels = np.array([s.is_anomalous for s in samples])
    # Tiling scores each image at its own resolution, so those are read one at a time, unresized.
    batch_size = 1 if tiling.enabled else 16
    batches = list(
        iterate_images([s.path for s in samples], detector.input_size, batch_size, 1, resize=not tiling.enabled)
    )
    unreadable = [item for batch in batches for item in batch if item.image is None]
    if unreadable:
        raise SystemExit(f"cannot read test image {unreadable[0].path}: {unreadable[0].error}")
    tiler = TiledPredictor(detector, tiling, 16) if tiling.enabled else None
    rows = []
    full = detector.model  # loaded on the detector's device, in eval mode
    for snap in snapshot_states(out):
        full.load_state_dict(snap.weights)
        detector.model = trained_part(full, snap.member)
        detector._fast = None  # drop the cached inference copy of the previous weights
        scores = np.array([score for batch in batches for score, _ in predict_items(detector, tiler, batch)])
        rows.append(
            {
                "train_min": round(snap.seconds / 60, 2),
                "model": snap.member + 1,
                "step": snap.step,
                "image_auroc": round(metrics.image_auroc(labels, scores), 4),
                "image_ap": round(metrics.average_precision(labels, scores), 4),
            }
        )
        print(rows[-1], flush=True)
    return rows


def final_row(report: Path) -> dict:
    """The finished run's training time, steps and accuracy from its benchmark report."""
    entry = json.loads(report.read_text(encoding="utf-8"))["entries"][0]
    acc = entry["accuracy"]
    keys = ("image_auroc", "image_ap", "pixel_auroc", "aupro")
    return {
        "train_min": round(entry["training"]["train_seconds"] / 60, 2),
        "step": entry["training"]["steps"],
        **{k: (round(acc[k], 4) if acc.get(k) is not None else None) for k in keys},
        "final": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="MVTec-layout dataset root")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="section.key=value for the training")
    parser.add_argument("--every-s", type=float, default=120.0, help="seconds of training between snapshots")
    parser.add_argument("--poll-s", type=float, default=2.0, help="seconds between looks at the checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--score-only", action="store_true", help="score the snapshots already in --out")
    args = parser.parse_args()
    out = args.out
    if not args.score_only:
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"{out} is not empty: choose a new folder (or --score-only to score it again)")
        train_with_snapshots(args, out)
    torch.set_num_threads(2)
    rows = score_snapshots(args.data, out)
    rows.append(final_row(out / "final" / "report.json"))
    (out / "curve.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    lines = [
        "| training min | model | step | image AUROC | image AP | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['train_min']}{' (finished run)' if r.get('final') else ''} | {r.get('model', 'all')} | "
            f"{r['step']} | "
            f"{r['image_auroc']} | {r['image_ap']} | {r.get('pixel_auroc', '')} | {r.get('aupro', '')} |"
        )
    (out / "curve.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
