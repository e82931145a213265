"""Shared helpers of the CS-Flow benchmark scripts: dataset loading (cached), metrics, RSS."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surfaceinspect.datasets import load_mvtec  # noqa: E402
from surfaceinspect.imageio import read_image, read_mask, resize_image  # noqa: E402
from surfaceinspect.metrics import image_auroc, pixel_auroc  # noqa: E402

# ../shared/data beside the checkout, or SURFACEINSPECT_DATA (e.g. a copy on another machine).
DATA_ROOT = Path(os.environ.get("SURFACEINSPECT_DATA", ROOT.parent / "shared" / "data"))
DATA = {"mtd": DATA_ROOT / "mtd", "bottle": DATA_ROOT / "mvtec_bottle"}
CACHE = Path("/tmp/csflow_bench_cache")


def load_split(name: str, size: int) -> dict:
    """Train images (N,3,S,S) uint8, test images uint8, labels, masks at original size (or None).

    Decoding goes through surfaceinspect.imageio (area resize, as the engine does). Cached under
    /tmp so repeated runs skip decoding; delete the folder to force a re-read.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    cache = CACHE / f"{name}_{size}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    ds = load_mvtec(DATA[name])

    def load(path: Path) -> torch.Tensor:
        return (resize_image(read_image(path), size) * 255 + 0.5).to(torch.uint8)

    train = torch.stack([load(p) for p in ds.train_good])
    test = torch.stack([load(s.path) for s in ds.test])
    labels = np.array([int(s.is_anomalous) for s in ds.test])
    masks = None
    if ds.has_masks:
        masks = []
        for s in ds.test:
            if s.mask_path is None:
                h, w = read_image(s.path).shape[-2:]
                masks.append(np.zeros((h, w), dtype=bool))
            else:
                masks.append(read_mask(s.mask_path))
    out = {"train": train, "test": test, "labels": labels, "masks": masks, "types": [s.defect_type for s in ds.test]}
    torch.save(out, cache)
    return out


def pixel_auroc_at_original_size(maps: torch.Tensor, masks: list[np.ndarray]) -> float:
    """Pixel AUROC with every map resized (bilinear) to its image's own resolution, as the engine does."""
    resized = []
    for m, mask in zip(maps, masks, strict=True):
        r = F.interpolate(m[None, None], size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
        resized.append(r.numpy())
    return pixel_auroc(masks, resized)


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


__all__ = ["image_auroc", "load_split", "peak_rss_gb", "pixel_auroc_at_original_size"]
