"""Copy an MVTec-layout data set with every image shrunk to at most ``--side`` px on its long side.

Used to carry the real data sets to a lent GPU machine within the 64 MiB a call may carry
(BENCHMARKS.md, section 9): images with ``cv2.INTER_AREA``, masks (under ``ground_truth/``) with
nearest-neighbour, PNG stays PNG, other formats are written as JPEG of ``--jpeg-quality``.

    python benchmarks/shrink_dataset.py ../shared/data/dagm_class1 gpudata/dagm_class1 --side 256
    python benchmarks/shrink_dataset.py ../shared/data/mtd gpudata/mtd --side 256 --jpeg-quality 85
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def shrink(src: Path, dst: Path, side: int, jpeg_quality: int) -> int:
    """Write the shrunk copy of ``src`` under ``dst``; returns the number of images written."""
    count = 0
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() not in SUFFIXES:
            continue
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        h, w = img.shape[:2]
        scale = side / max(h, w)
        if scale < 1:
            mask = "ground_truth" in path.relative_to(src).parts
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_NEAREST if mask else cv2.INTER_AREA)
        png = path.suffix.lower() == ".png"
        out = (dst / path.relative_to(src)).with_suffix(".png" if png else ".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        params = [cv2.IMWRITE_PNG_COMPRESSION, 9] if png else [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        if not cv2.imwrite(str(out), img, params):
            raise SystemExit(f"could not write {out}")
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--side", type=int, default=256, help="longest side after shrinking (px)")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    args = parser.parse_args()
    if args.dst.resolve().is_relative_to(args.src.resolve()):
        raise SystemExit("the destination lies inside the source; choose another folder")
    print(f"{shrink(args.src, args.dst, args.side, args.jpeg_quality)} images written to {args.dst}")


if __name__ == "__main__":
    main()
