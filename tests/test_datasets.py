"""Tests for the MVTec-layout reader and labelled calibration folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surfaceinspect.data.datasets import MVTecDataset, TestSample, labelled_folder, load_mvtec, validate_masks
from surfaceinspect.errors import DatasetError


def _img(p: Path, size: tuple[int, int] = (16, 12), value: int = 128) -> Path:
    """Write a small PNG of ``size`` = (W, H)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(p)
    return p


def _mask(p: Path, size: tuple[int, int] = (16, 12)) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[2:5, 3:7] = 255
    Image.fromarray(m).save(p)
    return p


def _make(root: Path, masks: bool = True, types: dict[str, int] | None = None) -> Path:
    types = types if types is not None else {"crack": 2, "hole": 1}
    for i in range(3):
        _img(root / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        _img(root / "test" / "good" / f"{i:03d}.png")
    for t, n in types.items():
        for i in range(n):
            _img(root / "test" / t / f"{i:03d}.png")
            if masks:
                _mask(root / "ground_truth" / t / f"{i:03d}_mask.png")
    return root


def test_load_full_layout(tmp_path: Path) -> None:
    root = _make(tmp_path / "ds")
    ds = load_mvtec(root)
    assert isinstance(ds, MVTecDataset) and ds.root == root
    assert ds.train_good == [root / "train" / "good" / f"{i:03d}.png" for i in range(3)]
    assert ds.has_masks
    assert ds.defect_types == ["crack", "hole"]
    assert (ds.n_good, ds.n_anomalous) == (2, 3)
    good = [s for s in ds.test if not s.is_anomalous]
    assert all(s.defect_type == "good" and s.mask_path is None for s in good)
    crack0 = next(s for s in ds.test if s.defect_type == "crack" and s.path.name == "000.png")
    assert crack0 == TestSample(
        root / "test" / "crack" / "000.png", "crack", True, root / "ground_truth" / "crack" / "000_mask.png"
    )
    # Deterministic order: by type folder name, then by file.
    assert [(s.defect_type, s.path.name) for s in ds.test] == [
        ("crack", "000.png"),
        ("crack", "001.png"),
        ("good", "000.png"),
        ("good", "001.png"),
        ("hole", "000.png"),
    ]


def test_no_ground_truth_is_valid(tmp_path: Path) -> None:
    ds = load_mvtec(_make(tmp_path / "ds", masks=False))
    assert not ds.has_masks and ds.n_anomalous == 3
    assert all(s.mask_path is None for s in ds.test)


def test_no_ground_truth_but_masks_required(tmp_path: Path) -> None:
    root = _make(tmp_path / "ds", masks=False)
    with pytest.raises(DatasetError, match="ground_truth"):
        load_mvtec(root, require_masks=True)


def test_missing_one_mask_names_image_and_expected_path(tmp_path: Path) -> None:
    root = _make(tmp_path / "ds")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError) as info:
        load_mvtec(root)
    msg = str(info.value)
    assert str(root / "test" / "crack" / "001.png") in msg
    assert str(root / "ground_truth" / "crack" / "001_mask.png") in msg
    assert "\n" not in msg


def test_type_without_any_mask(tmp_path: Path) -> None:
    root = _make(tmp_path / "ds")
    for p in (root / "ground_truth" / "hole").iterdir():
        p.unlink()
    (root / "ground_truth" / "hole").rmdir()
    ds = load_mvtec(root)  # allowed: the whole type is image-level only
    assert not ds.has_masks
    assert [s.mask_path for s in ds.test if s.defect_type == "hole"] == [None]
    assert all(s.mask_path is not None for s in ds.test if s.defect_type == "crack")
    with pytest.raises(DatasetError, match=r"hole.*000_mask\.png"):
        load_mvtec(root, require_masks=True)


def test_mask_size_mismatch(tmp_path: Path) -> None:
    root = _make(tmp_path / "ds")
    bad = _mask(root / "ground_truth" / "hole" / "000_mask.png", size=(20, 12))
    with pytest.raises(DatasetError) as info:
        load_mvtec(root)
    msg = str(info.value)
    assert str(bad) in msg and str(root / "test" / "hole" / "000.png") in msg
    assert "20x12" in msg and "16x12" in msg
    # Lazy mode: load succeeds, validate_masks reports the same problem.
    ds = load_mvtec(root, check_mask_sizes=False)
    with pytest.raises(DatasetError, match="20x12"):
        validate_masks(ds)


def test_unreadable_mask_is_dataset_error(tmp_path: Path) -> None:
    root = _make(tmp_path / "ds")
    (root / "ground_truth" / "crack" / "000_mask.png").write_text("not a png")
    with pytest.raises(DatasetError, match=r"000_mask\.png"):
        load_mvtec(root)


def test_masks_for_good_never_needed_and_gt_good_ignored(tmp_path: Path) -> None:
    root = _make(tmp_path / "ds")
    _mask(root / "ground_truth" / "good" / "zzz_mask.png")
    ds = load_mvtec(root)
    assert ds.has_masks and all(s.mask_path is None for s in ds.test if s.defect_type == "good")


def test_mask_with_other_suffix_accepted(tmp_path: Path) -> None:
    root = _make(tmp_path / "ds", types={"crack": 1})
    png = root / "ground_truth" / "crack" / "000_mask.png"
    _mask(png.with_suffix(".bmp"))
    png.unlink()
    ds = load_mvtec(root)
    assert ds.test[0].mask_path == png.with_suffix(".bmp")


@pytest.mark.parametrize(
    ("remove", "match"),
    [("train/good", r"train/good"), ("train", r"train/good"), ("test", r"test")],
)
def test_missing_folders(tmp_path: Path, remove: str, match: str) -> None:
    import shutil

    root = _make(tmp_path / "ds")
    shutil.rmtree(root / remove)
    with pytest.raises(DatasetError, match=match) as info:
        load_mvtec(root)
    assert "expected" in str(info.value)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_mvtec(tmp_path / "nope")


def test_empty_train_and_empty_test(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "train" / "good").mkdir(parents=True)
    (root / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_mvtec(root)
    _img(root / "train" / "good" / "a.png")
    with pytest.raises(DatasetError, match="no images"):
        load_mvtec(root)


def test_loose_image_in_test(tmp_path: Path) -> None:
    root = _make(tmp_path / "ds")
    loose = _img(root / "test" / "stray.png")
    with pytest.raises(DatasetError, match=r"stray\.png"):
        load_mvtec(root)
    loose.unlink()
    (root / "test" / "readme.txt").write_text("ignored")
    (root / "test" / ".DS_Store").write_text("ignored")
    _img(root / "test" / ".hidden" / "x.png")
    assert load_mvtec(root).n_anomalous == 3


# ---- labelled folders --------------------------------------------------------------------------


def test_labelled_folder(tmp_path: Path) -> None:
    root = tmp_path / "calib"
    _img(root / "good" / "g1.png")
    _img(root / "good" / "g0.jpg")
    _img(root / "scratch" / "s.png")
    _img(root / "dent" / "d.png")
    samples = labelled_folder(root)
    assert [(s.defect_type, s.path.name, s.is_anomalous) for s in samples] == [
        ("dent", "d.png", True),
        ("good", "g0.jpg", False),
        ("good", "g1.png", False),
        ("scratch", "s.png", True),
    ]
    assert all(s.mask_path is None for s in samples)


def test_labelled_folder_with_masks(tmp_path: Path) -> None:
    root = tmp_path / "calib"
    _img(root / "good" / "g.png")
    _img(root / "scratch" / "s.png")
    m = _mask(root / "ground_truth" / "scratch" / "s_mask.png")
    samples = labelled_folder(root)
    assert [s.defect_type for s in samples] == ["good", "scratch"]  # ground_truth is not a type
    assert samples[1].mask_path == m
    _img(root / "scratch" / "t.png")
    with pytest.raises(DatasetError, match=r"t_mask\.png"):
        labelled_folder(root)


def test_labelled_folder_good_only_ok_missing_good_fails(tmp_path: Path) -> None:
    root = tmp_path / "calib"
    _img(root / "good" / "g.png")
    assert len(labelled_folder(root)) == 1
    other = tmp_path / "other"
    _img(other / "scratch" / "s.png")
    with pytest.raises(DatasetError, match="good"):
        labelled_folder(other)
    with pytest.raises(DatasetError, match="not found"):
        labelled_folder(tmp_path / "missing")


# ---- real data ---------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_mtd(real_dataset) -> None:
    from surfaceinspect.data.imageio import read_image, read_mask

    ds = load_mvtec(real_dataset("mtd"), require_masks=True)
    assert len(ds.train_good) == 762 and ds.n_good == 190 and ds.n_anomalous == 392
    assert ds.defect_types == ["blowhole", "break", "crack", "fray", "uneven"]
    assert ds.has_masks
    counts = {t: sum(s.defect_type == t for s in ds.test) for t in ds.defect_types}
    assert counts == {"blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
    empty = [s for s in ds.test if s.mask_path is not None and not read_mask(s.mask_path).any()]
    assert len(empty) == 4 and {s.defect_type for s in empty} == {"uneven"}
    s = next(s for s in ds.test if s.defect_type == "crack")
    img = read_image(s.path)
    assert img.shape[1:] == read_mask(s.mask_path).shape
    assert (img[0] == img[1]).all() and (img[1] == img[2]).all()  # MTD is grayscale


@pytest.mark.realdata
def test_real_mvtec_bottle(real_dataset) -> None:
    root = real_dataset("mvtec_bottle")
    ds = load_mvtec(root)
    assert len(ds.train_good) == 209 and ds.n_good == 20 and ds.n_anomalous == 63
    assert ds.defect_types == ["broken_large", "broken_small", "contamination"]
    assert not ds.has_masks and all(s.mask_path is None for s in ds.test)
    with pytest.raises(DatasetError, match="ground_truth"):
        load_mvtec(root, require_masks=True)
