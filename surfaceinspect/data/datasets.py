"""The MVTec AD folder layout and labelled calibration folders.

MVTec layout::

    root/train/good/*                                 defect-free training images
    root/test/good/*                                  defect-free test images
    root/test/<defect_type>/*                         defective test images
    root/ground_truth/<defect_type>/<stem>_mask.png   masks (optional, nonzero = defect)

Mask rules (the same for :func:`load_mvtec` and :func:`labelled_folder`):

* No ``ground_truth/`` folder: valid, image-level labels only (``has_masks`` False).
* ``ground_truth/`` present: a defect type whose images have **no** mask at all (its folder is
  missing or holds none of the expected files) is accepted with ``mask_path=None`` for its
  images and ``has_masks`` False, unless ``require_masks`` is set. A type with masks for
  **some** of its images but not all is an error naming the first image without one and the
  expected mask path: half-annotated types are almost always a copying mistake.
* Masks for good images are never needed (``ground_truth/good`` is ignored).
* Mask sizes are checked **at load** against the image sizes (header reads only, fast); set
  ``check_mask_sizes=False`` to skip that and call :func:`validate_masks` later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from surfaceinspect.data.imageio import IMAGE_EXTENSIONS, discover_images, image_size, is_output_dir
from surfaceinspect.errors import DatasetError, ImageReadError

GOOD = "good"
GROUND_TRUTH = "ground_truth"
MASK_SUFFIX = "_mask"

_LAYOUT = "expected root/train/good/, root/test/good/, root/test/<defect_type>/ and optionally root/ground_truth/"


@dataclass
class TestSample:
    """One labelled image: ``defect_type`` is 'good' for defect-free images."""

    __test__ = False  # not a pytest test class despite the name

    path: Path
    defect_type: str
    is_anomalous: bool
    mask_path: Path | None = None


@dataclass
class MVTecDataset:
    """A dataset in the MVTec AD layout (see the module docstring)."""

    root: Path
    train_good: list[Path]
    test: list[TestSample] = field(default_factory=list)
    has_masks: bool = False

    @property
    def defect_types(self) -> list[str]:
        """Sorted names of the defect types present in the test set ('good' excluded)."""
        return sorted({s.defect_type for s in self.test if s.is_anomalous})

    @property
    def n_good(self) -> int:
        """Number of defect-free test images."""
        return sum(not s.is_anomalous for s in self.test)

    @property
    def n_anomalous(self) -> int:
        """Number of defective test images."""
        return sum(s.is_anomalous for s in self.test)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_mask(gt_type_dir: Path, rel_image: Path) -> Path | None:
    """``<stem>_mask.png`` next to where the image sits relative to its type folder; other image
    suffixes (``_mask.bmp`` ...) are accepted as a fallback."""
    base = gt_type_dir / rel_image.parent / f"{rel_image.stem}{MASK_SUFFIX}"
    preferred = base.with_name(base.name + ".png")
    if preferred.is_file():
        return preferred
    for ext in sorted(IMAGE_EXTENSIONS - {".png"}):
        for cand in (base.with_name(base.name + ext), base.with_name(base.name + ext.upper())):
            if cand.is_file():
                return cand
    return None


def _labelled_samples(
    folder: Path, gt_dir: Path | None, require_masks: bool, what: str
) -> tuple[list[TestSample], bool]:
    """Samples from ``folder/good`` and ``folder/<type>`` with masks from ``gt_dir``; returns (samples, has_masks)."""
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise DatasetError(
            f"{loose[0]}: image directly in {what}; move it into {folder / GOOD}/ or {folder}/<defect_type>/"
        )
    if require_masks and (gt_dir is None or not gt_dir.is_dir()):
        raise DatasetError(f"{gt_dir}: missing mask folder; masks are required (<defect_type>/<stem>_mask.png)")
    if gt_dir is not None and not gt_dir.is_dir():
        gt_dir = None

    samples: list[TestSample] = []
    all_masked = True
    for type_dir in _subdirs(folder):
        if type_dir.name == GROUND_TRUTH:
            continue  # masks of a labelled calibration folder, not a defect type
        images = discover_images(type_dir)
        if type_dir.name == GOOD:
            samples += [TestSample(p, GOOD, False, None) for p in images]
            continue
        if not images:
            continue
        masks: list[Path | None] = [None] * len(images)
        if gt_dir is not None:
            masks = [_find_mask(gt_dir / type_dir.name, p.relative_to(type_dir)) for p in images]
        n_masked = sum(m is not None for m in masks)
        if n_masked < len(images) and (n_masked > 0 or require_masks):
            i = next(i for i, m in enumerate(masks) if m is None)
            rel = images[i].relative_to(type_dir)
            expected = gt_dir / type_dir.name / rel.parent / f"{rel.stem}{MASK_SUFFIX}.png"  # type: ignore[operator]
            raise DatasetError(
                f"{images[i]}: no mask; expected {expected} "
                f"({len(images) - n_masked} of {len(images)} '{type_dir.name}' images lack a mask)"
            )
        all_masked &= n_masked == len(images)
        samples += [TestSample(p, type_dir.name, True, m) for p, m in zip(images, masks, strict=True)]
    has_anomalous = any(s.is_anomalous for s in samples)
    return samples, gt_dir is not None and has_anomalous and all_masked


@dataclass
class LabelledLayout:
    """A folder laid out with labels (so not a plain folder of good images)."""

    root: Path  # the labelled folder: good/ + defect subfolders (an MVTec test/ folder)
    good_dir: Path  # where the defect-free images are
    defect_types: list[str]  # names of the defect subfolders (may be empty for an MVTec root)
    mvtec_root: bool  # root/train/good exists: a whole dataset, not just its test folder


def find_labelled_layout(folder: str | os.PathLike[str]) -> LabelledLayout | None:
    """Recognise an MVTec dataset root or a labelled folder (``good/`` + defect subfolders).

    Training on such a folder, or calibrating on it as if every image were good, would treat
    defects as good images; the caller refuses it and points at ``good/``. Checks ``folder``
    itself only (a plain folder that merely has a subfolder named ``good`` is fine).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / "train" / GOOD).is_dir():
        test = folder / "test"
        types = [d.name for d in _subdirs(test) if d.name != GOOD] if test.is_dir() else []
        return LabelledLayout(folder, folder / "train" / GOOD, types, mvtec_root=True)
    if not (folder / GOOD).is_dir():
        return None
    others = [
        d
        for d in _subdirs(folder)
        if d.name != GOOD and not is_output_dir(d) and (d.name == GROUND_TRUTH or discover_images(d))
    ]
    if not others:
        return None
    return LabelledLayout(folder, folder / GOOD, [d.name for d in others if d.name != GROUND_TRUTH], mvtec_root=False)


def validate_masks(ds: MVTecDataset | list[TestSample]) -> None:
    """Check that every mask has the size of its image (headers only); raises :class:`DatasetError`."""
    samples = ds.test if isinstance(ds, MVTecDataset) else ds
    for s in samples:
        if s.mask_path is None:
            continue
        try:
            img_hw, mask_hw = image_size(s.path), image_size(s.mask_path)
        except ImageReadError as exc:
            raise DatasetError(str(exc)) from None
        if img_hw != mask_hw:
            raise DatasetError(
                f"{s.mask_path}: mask is {mask_hw[1]}x{mask_hw[0]} but its image {s.path} is "
                f"{img_hw[1]}x{img_hw[0]}; masks must have the image's size"
            )


def load_mvtec(
    root: str | os.PathLike[str], require_masks: bool = False, check_mask_sizes: bool = True
) -> MVTecDataset:
    """Read a dataset in the MVTec AD layout (rules in the module docstring).

    Raises :class:`DatasetError` naming what is missing: the root, ``train/good``, ``test``,
    images, or a mask (with its expected path); or a mask whose size differs from its image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found ({_LAYOUT})")
    train_dir, test_dir = root / "train" / GOOD, root / "test"
    if not train_dir.is_dir():
        raise DatasetError(f"{train_dir}: missing folder of defect-free training images ({_LAYOUT})")
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: missing test folder ({_LAYOUT})")
    train_good = discover_images(train_dir)
    if not train_good:
        raise DatasetError(f"{train_dir}: no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    test, has_masks = _labelled_samples(test_dir, root / GROUND_TRUTH, require_masks, "test/")
    if not test:
        raise DatasetError(f"{test_dir}: no images in test/good/ or test/<defect_type>/ ({_LAYOUT})")
    ds = MVTecDataset(root=root, train_good=train_good, test=test, has_masks=has_masks)
    if check_mask_sizes:
        validate_masks(ds)
    return ds


def labelled_folder(
    root: str | os.PathLike[str], require_masks: bool = False, check_mask_sizes: bool = True
) -> list[TestSample]:
    """Labelled images from ``root/good/`` and ``root/<defect_type>/`` (any other subfolder).

    Laid out like MVTec's ``test/``; optional masks go in ``root/ground_truth/<defect_type>/``
    (so ``ground_truth`` is not a defect type), with the same rules as :func:`load_mvtec`.
    ``root/good`` must exist and hold images; defect subfolders are optional.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: labelled folder not found; expected {root}/good/ and {root}/<defect_type>/")
    if not (root / GOOD).is_dir():
        raise DatasetError(f"{root / GOOD}: missing folder of defect-free images; expected good/ and <defect_type>/")
    samples, _ = _labelled_samples(root, root / GROUND_TRUTH, require_masks, f"{root}")
    if not any(not s.is_anomalous for s in samples):
        raise DatasetError(f"{root / GOOD}: no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if check_mask_sizes:
        validate_masks(samples)
    return samples
