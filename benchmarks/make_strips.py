"""Build a line-scan-like benchmark from an MVTec-layout dataset: strips of real images side by side.

Each strip is ``--per-strip`` images of the source dataset placed left to right (all resized to
``--height`` rows, keeping their aspect), so a strip is long and narrow like a line camera's output
and a real defect covers a tiny share of it. The result is an MVTec-layout dataset:

* ``train/good``: strips of random training images (images may repeat across strips, never within one);
* ``test/good``: strips of random good test images;
* ``test/<type>``: one strip per defective test image, holding that image (at a random position)
  and good test images elsewhere, so each defective strip contains exactly one real defect;
* ``ground_truth/<type>/<name>_mask.png``: the defect's mask placed where its image went.

Reproducible from ``--seed``. Example (DAGM class 1, 512 x 3072 strips, 1:6):

    .venv/bin/python benchmarks/make_strips.py ../shared/data/dagm_class1 /tmp/dagm_strips --per-strip 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from surfaceinspect.data.datasets import load_mvtec
from surfaceinspect.data.imageio import read_image_uint8, read_mask


def _row(images: list[np.ndarray], height: int) -> tuple[np.ndarray, list[int]]:
    """Images resized to ``height`` rows and concatenated; also the x offset of each."""
    parts, offsets, x = [], [], 0
    for img in images:
        width = max(1, round(img.shape[1] * height / img.shape[0]))
        parts.append(cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA))
        offsets.append(x)
        x += width
    return np.concatenate(parts, axis=1), offsets


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 3 and (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all():
        image = image[..., 0]  # grey data stays one channel (a third of the disk)
    data = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), data):
        raise OSError(f"cannot write {path}")


def build(source: Path, out: Path, per_strip: int, height: int, n_train: int, n_test_good: int, seed: int) -> None:
    """Write the strip dataset to ``out`` (which must not exist yet)."""
    ds = load_mvtec(source)
    rng = np.random.default_rng(seed)
    cache: dict[Path, np.ndarray] = {}

    def image(path: Path) -> np.ndarray:
        if path not in cache:
            cache[path] = read_image_uint8(path)
        return cache[path]

    def strip(pool: list[Path], count: int) -> list[Path]:
        return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]

    train_pool = list(ds.train_good)
    good_pool = [s.path for s in ds.test if not s.is_anomalous]
    for i in range(n_train):
        row, _ = _row([image(p) for p in strip(train_pool, per_strip)], height)
        _save(out / "train" / "good" / f"{i:04d}.png", row)
    for i in range(n_test_good):
        row, _ = _row([image(p) for p in strip(good_pool, per_strip)], height)
        _save(out / "test" / "good" / f"{i:04d}.png", row)
    for k, sample in enumerate(s for s in ds.test if s.is_anomalous):
        members = strip(good_pool, per_strip - 1)
        slot = int(rng.integers(0, per_strip))
        members.insert(slot, sample.path)
        row, offsets = _row([image(p) for p in members], height)
        name = f"{k:04d}"
        _save(out / "test" / sample.defect_type / f"{name}.png", row)
        if sample.mask_path is not None:
            mask = np.zeros(row.shape[:2], np.uint8)
            defect = read_mask(sample.mask_path).astype(np.uint8) * 255
            width = (offsets[slot + 1] if slot + 1 < per_strip else row.shape[1]) - offsets[slot]
            placed = cv2.resize(defect, (width, height), interpolation=cv2.INTER_NEAREST)
            mask[:, offsets[slot] : offsets[slot] + width] = placed
            _save(out / "ground_truth" / sample.defect_type / f"{name}_mask.png", mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="MVTec-layout dataset (train/good, test/..., ground_truth/...)")
    ap.add_argument("out", type=Path, help="new folder for the strip dataset")
    ap.add_argument("--per-strip", type=int, default=6, help="images per strip (the aspect ratio)")
    ap.add_argument("--height", type=int, default=512, help="rows of every strip")
    ap.add_argument("--train", type=int, default=120, help="training strips")
    ap.add_argument("--test-good", type=int, default=60, help="good test strips")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; choose a new folder (this script never writes over files)")
    build(args.source, args.out, args.per_strip, args.height, args.train, args.test_good, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
