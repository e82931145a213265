"""Input folders and files: the checks every workflow makes before it reads an image."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from surfaceinspect.config import RunConfig
from surfaceinspect.data.datasets import find_labelled_layout
from surfaceinspect.data.imageio import discover_images, supported_suffixes
from surfaceinspect.errors import DatasetError
from surfaceinspect.ui import Reporter, plural

MAX_LISTED_FAILURES = 10


def require_input(path: Path) -> Path:
    """Fail early (before loading a model) when the image file or folder does not exist (links named as such)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            what = "is a symbolic link loop (it leads back to itself)"
        elif path.is_symlink():
            what = "is a broken symbolic link (its target does not exist)"
        else:
            what = "does not exist"
        raise DatasetError(f"{path} {what}; give an image file or a folder of images") from None
    return path


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or its name when ``root`` is the file itself."""
    try:
        rel = path.relative_to(root)
        return rel.as_posix() if str(rel) != "." else path.name
    except ValueError:
        return path.name


def split_calibration(
    files: Sequence[Path], run_config: RunConfig, folder: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """Deterministically hold out ``max(min_images, fraction * N)`` files for calibration.

    Too few files is refused with the fix first: more good images. The minimum is a safety
    setting (fewer calibration images cannot guarantee the false-reject rate), so lowering it is
    only named as what decides the number, not offered as the way out.
    """
    cal = run_config.common.calibration
    n = len(files)
    n_cal = max(cal.min_images, round(cal.fraction * n))
    if n - n_cal < 2:
        where = f"{folder}: " if folder is not None else ""
        raise DatasetError(
            f"{where}{plural(n, 'good image')}, but training needs at least {n_cal + 2}: {n_cal} held out to set "
            f"the threshold and 2 or more to learn from; add images of defect-free parts (how many are held out "
            f"is set by common.calibration.min_images and fraction)"
        )
    order = np.random.default_rng(run_config.common.seed).permutation(n)
    cal_idx = set(order[:n_cal].tolist())
    train = [f for i, f in enumerate(files) if i not in cal_idx]
    calib = [f for i, f in enumerate(files) if i in cal_idx]
    return train, calib


def find_images(root: Path, reporter: Reporter) -> list[Path]:
    """The input images under ``root`` (see ``discover_images``); says which output folders and files it skips.

    Files that are not images (``report.pdf``) are named in a warning: a part whose picture was
    saved in a format that is not read would otherwise go uninspected without a word.
    """
    skipped: list[Path] = []
    found_others: list[Path] = []
    paths = discover_images(root, skipped=skipped, others=found_others)
    if skipped:
        reporter.info(f"skipping output folder(s) of surfaceinspect inside the input: {_listed(skipped)}")
    # records files (this run's own FILE.part among them) are no pictures anyone expects to be scored
    others = [p for p in found_others if p.suffix.lower() not in _RECORDS_SUFFIXES]
    if others:
        reporter.warn(
            f"{plural(len(others), 'file')} skipped, not in an image format that is read "
            f"({supported_suffixes()}): {_listed(others)}"
        )
    return paths


_RECORDS_SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson", ".json", ".part"})


def _listed(paths: Sequence[Path]) -> str:
    """The first :data:`MAX_LISTED_FAILURES` paths, and how many more."""
    names = ", ".join(str(p) for p in paths[:MAX_LISTED_FAILURES])
    return names + (f" and {len(paths) - MAX_LISTED_FAILURES} more" if len(paths) > MAX_LISTED_FAILURES else "")


def refuse_labelled_folder(folder: Path, command: str) -> None:
    """Refuse to treat a labelled folder (MVTec root, or good/ + defect subfolders) as all-good images.

    ``command`` is ``train`` or ``recalibrate``; the message says what to run instead.
    """
    layout = find_labelled_layout(folder)
    if layout is None:
        return
    if layout.mvtec_root:
        what = f"{folder} is a dataset in MVTec layout (train/good, test/...)"
    else:
        what = f"{folder} is a labelled folder (good/ plus defect folders: {', '.join(layout.defect_types)})"
    labelled = layout.root / "test" if layout.mvtec_root else layout.root
    if command == "train":
        fix = f"train on {layout.good_dir} (add --calibration-dir {labelled} to calibrate on the labelled images)"
    else:
        fix = f"recalibrate on {layout.good_dir}, or on {labelled} --labelled --mode f1|recall"
    raise DatasetError(f"{what}; its defects would be taken for good images: {fix}")


def report_failures(reporter: Reporter, failures: list[tuple[Path, str]], what: str) -> None:
    for path, reason in failures[:MAX_LISTED_FAILURES]:
        reporter.warn(f"skipped unreadable {what} {path}: {reason}")
    if len(failures) > MAX_LISTED_FAILURES:
        reporter.warn(f"... and {len(failures) - MAX_LISTED_FAILURES} more unreadable {what}s")


def colour_mode(grey_flags: Sequence[bool]) -> str:
    """``grey``, ``colour`` or ``mixed`` for a set of images' greyscale flags."""
    n_grey = sum(bool(g) for g in grey_flags)
    return "grey" if n_grey == len(grey_flags) else "colour" if n_grey == 0 else "mixed"
