"""Synthetic evidence for label-free model selection, on generated textures and gradients."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from surfaceinspect.data.evidence import (
    ANOMALY_KINDS,
    AREA_FRACTIONS,
    EvidenceImage,
    synthesize_anomaly,
    write_evidence,
)
from surfaceinspect.data.imageio import read_image_uint8

# Hard-edged kinds change nothing outside their mask; blur and dent fade out over their rim.
SOFT_KINDS = ("blur", "dent")
# Mask area / target area. A scar or scratch that meets the border of a narrow image cannot get
# longer, so its area may fall short of the target further than a patch or an ellipse does.
AREA_BOUNDS = {
    "cutpaste": (0.3, 2.0),
    "scar": (0.15, 2.0),
    "scratch": (0.15, 2.0),
    "blur": (0.3, 2.0),
    "dent": (0.3, 2.0),
}


def _texture(h: int, w: int, seed: int, grey: bool = False) -> np.ndarray:
    """Fine random texture around mid-grey (std ~30), colour or with three equal channels."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0.0, 1.0, (h, w, 3)).astype(np.float32), (0, 0), 1.0)
    noise = noise[..., :1].repeat(3, axis=2) if grey else noise
    return np.clip(128 + 30 * noise / noise.std(), 0, 255).astype(np.uint8)


def _gradient(h: int, w: int) -> np.ndarray:
    """A smooth grey ramp, as a plain lit surface looks."""
    y, x = np.mgrid[0:h, 0:w]
    return np.repeat((60 + 120 * x / w + 30 * y / h).astype(np.uint8)[..., None], 3, axis=2)


def _write(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _good_set(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [_write(folder / f"good_{i:02d}.png", _texture(64, 96, seed=i)) for i in range(n)]


@pytest.mark.parametrize("shape", [(96, 320), (128, 128), (32, 640)])  # the last: a line-scan strip
@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_anomaly_changes_inside_mask_only_at_target_area(kind, shape):
    image, donor = _texture(*shape, seed=1), _texture(*shape, seed=2)
    low, high = AREA_BOUNDS[kind]
    for area in AREA_FRACTIONS:
        for seed in range(4):
            out, mask = synthesize_anomaly(image, donor, kind, area, np.random.default_rng(seed))
            assert out.shape == image.shape and out.dtype == np.uint8
            assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
            inside = mask > 0
            assert low <= inside.sum() / (area * image.shape[0] * image.shape[1]) <= high
            diff = np.abs(out.astype(np.int16) - image).max(axis=2)
            assert diff[inside].mean() >= 8, "the anomaly must be visible inside its mask"
            if kind in SOFT_KINDS:
                assert diff[~inside].max() <= 5  # the soft rim fades out just outside the ellipse
                rim = cv2.dilate(mask, np.ones((9, 9), np.uint8)) > 0
                assert diff[~rim].max() <= 1
            else:
                assert diff[~inside].max() == 0


@pytest.mark.parametrize("kind", [k for k in ANOMALY_KINDS if k != "blur"])  # blurring a linear ramp changes nothing
def test_anomaly_visible_on_plain_surfaces(kind):
    for image in (_gradient(96, 160), np.full((96, 160, 3), 250, np.uint8), np.full((96, 160, 3), 4, np.uint8)):
        for seed in range(4):
            out, mask = synthesize_anomaly(image, image[::-1].copy(), kind, 0.03, np.random.default_rng(seed))
            diff = np.abs(out.astype(np.int16) - image).max(axis=2)
            assert diff[mask > 0].max() >= 15
            assert diff[mask > 0].mean() >= 5
            assert (out[mask > 0] == 0).mean() < 0.5 and (out[mask > 0] == 255).mean() < 0.5  # not flattened


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_greyscale_stays_grey_and_inputs_untouched(kind):
    image, donor = _texture(96, 128, seed=3, grey=True), _texture(80, 200, seed=4)  # colour donor, other size
    image_before, donor_before = image.copy(), donor.copy()
    for seed in range(3):
        out, _ = synthesize_anomaly(image, donor, kind, 0.08, np.random.default_rng(seed))
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert np.array_equal(image, image_before) and np.array_equal(donor, donor_before)


def test_colour_image_keeps_colour():
    image = _texture(64, 64, seed=5)
    out, _ = synthesize_anomaly(image, _texture(64, 64, seed=6), "cutpaste", 0.08, np.random.default_rng(0))
    assert not np.array_equal(out[..., 0], out[..., 1])


def test_synthesize_rejects_bad_input():
    image = _texture(32, 32, seed=0)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown anomaly kind"):
        synthesize_anomaly(image, image, "perlin", 0.03, rng)
    with pytest.raises(ValueError, match="area"):
        synthesize_anomaly(image, image, "dent", 0.0, rng)
    with pytest.raises(ValueError, match="uint8"):
        synthesize_anomaly(image.astype(np.float32), image, "dent", 0.03, rng)
    with pytest.raises(ValueError, match="16 px"):
        synthesize_anomaly(image[:8], image, "dent", 0.03, rng)


def _contents(items: list[EvidenceImage]) -> dict[Path, bytes]:
    return {item.path: item.path.read_bytes() for item in items}


def test_write_evidence_is_deterministic(tmp_path):
    goods = _good_set(tmp_path / "good", 4)
    goods.append(_write(tmp_path / "good" / "wide.png", _texture(48, 160, seed=9)))  # donor of another size
    first = write_evidence(goods, tmp_path / "a", seed=7)
    first_bytes = _contents(first)
    second = write_evidence(goods, tmp_path / "a", seed=7)
    assert second == first and _contents(second) == first_bytes
    other = write_evidence(goods, tmp_path / "b", seed=8)
    assert [(e.kind, e.area, e.source) for e in other] == [(e.kind, e.area, e.source) for e in first]
    assert [e.path.read_bytes() for e in other] != list(first_bytes.values())


def test_write_evidence_files_and_records(tmp_path):
    goods = _good_set(tmp_path / "good", 3)
    out_dir = tmp_path / "evidence"
    items = write_evidence(goods, out_dir, seed=0, per_image=2)
    assert len(items) == 6
    for n, item in enumerate(items):
        assert item.kind in ANOMALY_KINDS and item.area in AREA_FRACTIONS
        assert item.source == goods[n // 2]
        assert item.path == out_dir / item.kind / f"{n:04d}_{item.source.stem}.png"
        written = read_image_uint8(item.path)
        assert written.shape == (64, 96, 3)
        assert not np.array_equal(written, read_image_uint8(item.source))
    assert len({(item.source, item.kind) for item in items}) == 6  # one image's variants differ in kind


def test_write_evidence_spreads_kinds_and_areas(tmp_path):
    goods = _good_set(tmp_path / "good", 10)
    items = write_evidence(goods, tmp_path / "evidence", seed=1)
    assert len(items) == 30
    assert Counter(item.kind for item in items) == dict.fromkeys(ANOMALY_KINDS, 6)
    assert Counter(item.area for item in items) == dict.fromkeys(AREA_FRACTIONS, 10)
    assert Counter((item.kind, item.area) for item in items) == {
        (kind, area): 2 for kind in ANOMALY_KINDS for area in AREA_FRACTIONS
    }
    # Kinds and areas that share a factor still reach every combination.
    few = write_evidence(goods[:4], tmp_path / "few", seed=1, per_image=2, kinds=("scar", "dent"), areas=(0.02, 0.05))
    assert Counter((item.kind, item.area) for item in few) == {
        (kind, area): 2 for kind in ("scar", "dent") for area in (0.02, 0.05)
    }


def test_write_evidence_skips_unreadable_and_reports(tmp_path):
    goods = _good_set(tmp_path / "good", 2)
    garbage = tmp_path / "good" / "x.png"
    garbage.write_bytes(b"this is not a png at all")
    tiny = _write(tmp_path / "good" / "tiny.png", _texture(8, 8, seed=0))
    warnings: list[str] = []
    items = write_evidence(
        [goods[0], garbage, tiny, goods[1]], tmp_path / "evidence", seed=0, reporter_warn=warnings.append
    )
    assert {item.source for item in items} == set(goods)
    assert len(items) == 6
    assert len(warnings) == 2
    assert "x.png" in warnings[0] and "unreadable" in warnings[0]
    assert "tiny.png" in warnings[1] and "small" in warnings[1]
    assert write_evidence([garbage], tmp_path / "none", seed=0) == []  # no reporter: skipped quietly


def test_write_evidence_single_image_uses_itself_mirrored(tmp_path):
    (good,) = _good_set(tmp_path / "good", 1)
    items = write_evidence([good], tmp_path / "evidence", seed=3, per_image=5)
    assert [item.kind for item in items] == list(ANOMALY_KINDS)
    assert all(item.path.is_file() for item in items)


def test_write_evidence_rejects_bad_plan(tmp_path):
    goods = _good_set(tmp_path / "good", 1)
    with pytest.raises(ValueError, match="per_image"):
        write_evidence(goods, tmp_path / "e", seed=0, per_image=0)
    with pytest.raises(ValueError, match="kinds"):
        write_evidence(goods, tmp_path / "e", seed=0, kinds=("cutpaste", "perlin"))
    with pytest.raises(ValueError, match="areas"):
        write_evidence(goods, tmp_path / "e", seed=0, areas=(0.9,))
    assert not (tmp_path / "e").exists()
