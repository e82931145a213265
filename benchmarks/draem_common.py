"""Shared helpers of the DRAEM benchmark scripts: cached dataset splits, training, evaluation.

The split cache (``.npz``, images already resized to S) lets the scripts run where the raw data is
absent (e.g. a GPU machine used for the source ablation): build it once with the data present.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surfaceinspect.config import CommonConfig, RunConfig, dataclass_from_dict, deep_merge  # noqa: E402
from surfaceinspect.detectors.base import TrainContext, TrainProgress  # noqa: E402
from surfaceinspect.detectors.draem import DraemConfig, DraemDetector  # noqa: E402

# ../shared/data beside the checkout, or SURFACEINSPECT_DATA (e.g. a copy on another machine).
DATA_ROOT = Path(os.environ.get("SURFACEINSPECT_DATA", ROOT.parent / "shared" / "data"))
DATA = {"mtd": DATA_ROOT / "mtd", "bottle": DATA_ROOT / "mvtec_bottle"}
CACHE = Path("/tmp/draem_bench_cache")


def load_split(name: str, size: int, cache_dir: Path = CACHE) -> dict[str, Any]:
    """Train uint8 (N,3,S,S), test uint8 (M,3,S,S), labels (M,), masks bool (M,S,S) or None, types.

    Images are decoded and area-resized through surfaceinspect.imageio, as the engine does; masks
    are resized with nearest neighbour. Cached in ``cache_dir/<name>_<size>.npz``.
    """
    cache = Path(cache_dir) / f"{name}_{size}.npz"
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        masks = z["masks"] if z["has_masks"] else None
        return {
            "train": torch.from_numpy(z["train"]),
            "test": torch.from_numpy(z["test"]),
            "labels": z["labels"],
            "masks": masks,
            "types": list(z["types"]),
        }
    import cv2

    from surfaceinspect.datasets import load_mvtec
    from surfaceinspect.imageio import read_image, read_mask, resize_image

    ds = load_mvtec(DATA[name])

    def load(path: Path) -> torch.Tensor:
        return (resize_image(read_image(path), size) * 255 + 0.5).to(torch.uint8)

    train = torch.stack([load(p) for p in ds.train_good])
    test = torch.stack([load(s.path) for s in ds.test])
    labels = np.array([int(s.is_anomalous) for s in ds.test])
    masks = np.zeros((len(ds.test), size, size), dtype=bool)
    for i, s in enumerate(ds.test):
        if s.mask_path is not None:
            m = read_mask(s.mask_path).astype(np.uint8)
            masks[i] = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        cache,
        train=train.numpy(),
        test=test.numpy(),
        labels=labels,
        masks=masks,
        has_masks=np.array(ds.has_masks),
        types=np.array([s.defect_type for s in ds.test]),
    )
    return load_split(name, size, cache_dir)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["draem.steps=100", "common.batch_size=4"]`` -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, raw = item.split("=", 1)
        section, name = key.split(".", 1)
        out = deep_merge(out, {section: {name: yaml.safe_load(raw)}})
    return out


def make_run_config(profile_yaml: Path | None, overrides: list[str]) -> RunConfig:
    """A validated RunConfig from an optional profile file plus ``section.key=value`` overrides."""
    import yaml

    data: dict[str, Any] = {}
    if profile_yaml is not None:
        data = yaml.safe_load(Path(profile_yaml).read_text()) or {}
    data = deep_merge(data, parse_overrides(overrides))
    common = dataclass_from_dict(CommonConfig, data.get("common") or {}, prefix="common")
    cfg = dataclass_from_dict(DraemConfig, data.get("draem") or {}, prefix="draem")
    run = RunConfig("draem", Path(profile_yaml).stem if profile_yaml else "custom", common, cfg)
    run.validate()
    return run


def train(run: RunConfig, images: torch.Tensor, device: str = "cpu", log_every: int = 50) -> tuple[Any, dict]:
    """Train a DraemDetector, printing progress every ``log_every`` steps."""
    det = DraemDetector(run, torch.device(device))
    t0 = time.monotonic()

    def on_progress(p: TrainProgress) -> None:
        if p.step % log_every == 0 or p.step == p.total:
            loss = f"{p.loss:.4f}" if p.loss is not None else "-"
            parts = " ".join(f"{k}={v:.4g}" for k, v in p.info.items())
            print(f"  step {p.step}/{p.total} loss {loss} {parts} [{time.monotonic() - t0:.0f}s]", flush=True)

    ctx = TrainContext(on_progress=on_progress, time_budget_s=run.common.time_budget_min * 60.0)
    summary = det.fit(images, ctx)
    return det, summary


def evaluate(det: DraemDetector, split: dict[str, Any], batch: int = 16) -> dict[str, float]:
    """Image AUROC and (with masks) pixel AUROC at S x S over the test split."""
    from sklearn.metrics import roc_auc_score

    scores, maps = [], []
    t0 = time.monotonic()
    for i in range(0, len(split["test"]), batch):
        pred = det.predict(split["test"][i : i + batch].float() / 255.0)
        scores.append(pred.scores)
        maps.append(pred.maps)
    seconds = time.monotonic() - t0
    s = torch.cat(scores).numpy()
    m = torch.cat(maps).numpy()
    out = {"image_auroc": float(roc_auc_score(split["labels"], s)), "eval_s": round(seconds, 1)}
    if split["masks"] is not None and split["masks"].any():
        out["pixel_auroc"] = float(roc_auc_score(split["masks"].ravel(), m.ravel()))
    return out


def maps_to_size(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, S, S) maps to (B, H, W)."""
    return F.interpolate(maps[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
