"""DRAEM's extra anomaly shapes (cracks, surface patches), rotation, and the synthetic-validation
early stop (generated data only)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from test_draem import random_uint8, tiny_run

from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.detectors.draem import DraemDetector
from surfaceinspect.detectors.draem.perlin import crack_mask, perlin_mask
from surfaceinspect.detectors.draem.sources import make_source
from surfaceinspect.detectors.draem.synthesis import SynthesisDataset, SynthesisParams, surface_patch, synthesize
from surfaceinspect.detectors.draem.validation import SyntheticValidationSet, split_validation
from surfaceinspect.errors import ConfigError


def _surviving_erosion(mask: np.ndarray, side: int) -> float:
    """Share of the mask's pixels left after eroding with a side x side square."""
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((side, side), np.uint8))
    return float(eroded.sum()) / max(1.0, float(mask.sum()))


@pytest.mark.parametrize("shape", [(128, 128), (96, 160)])
def test_crack_masks_are_thin_curves(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    cracks = [crack_mask(shape, rng) for _ in range(40)]
    assert all(m.shape == shape and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0} for m in cracks)
    filled = [m for m in cracks if m.any()]
    assert len(filled) >= 30  # most masks hold a crack
    # Lines 1-3 px wide vanish under a 5x5 erosion; Perlin blobs of the same images mostly survive it.
    assert np.median([_surviving_erosion(m, 5) for m in filled]) < 0.05
    assert all(m.mean() < 0.2 for m in filled)
    blobs = [m for m in (perlin_mask(shape, rng, (0, 2), 0.5) for _ in range(20)) if m.any()]
    assert np.median([_surviving_erosion(m, 5) for m in blobs]) > 0.4
    assert np.array_equal(crack_mask(shape, np.random.default_rng(7)), crack_mask(shape, np.random.default_rng(7)))


def test_surface_patch_changes_only_its_region() -> None:
    rng = np.random.default_rng(1)
    image = np.random.default_rng(2).uniform(0.2, 0.8, size=(64, 64, 3)).astype(np.float32)
    for _ in range(20):
        out, mask = surface_patch(image, rng)
        assert out.shape == image.shape and mask.shape == (64, 64) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        change = np.abs(out - image).mean(axis=2)
        if not mask.any():
            continue
        assert change[mask > 0].mean() > 0.03  # a visible change of finish or brightness
        # The label holds every pixel changed at more than half strength (the rim is soft); most of
        # the rest of the image is untouched.
        assert change[mask == 0].max() <= 0.5 * change[mask > 0].max() + 1e-6
        far = cv2.erode((1 - mask).astype(np.uint8), np.ones((11, 11), np.uint8)) > 0
        assert np.mean(change[far] == 0.0) > 0.9


def test_anomaly_kinds_follow_their_shares() -> None:
    image = np.full((64, 64, 3), 0.5, dtype=np.float32)
    source = make_source("fractal")
    crack = SynthesisParams(anomaly_prob=1.0, crack_prob=1.0, opacity_range=(1.0, 1.0))
    patch = SynthesisParams(anomaly_prob=1.0, patch_prob=1.0)
    for seed in range(10):
        out, mask = synthesize(image, source, crack, np.random.default_rng(seed))
        if mask.any():
            assert _surviving_erosion(mask, 5) < 0.2
            assert np.abs(out - image).max(axis=2)[mask == 0].max() == 0.0  # texture only inside the crack
        out, mask = synthesize(image, source, patch, np.random.default_rng(seed))
        # A patch brings no new texture: on a flat image it only scales the brightness, so it stays flat per pixel.
        assert np.allclose(out[..., 0], out[..., 1]) and np.allclose(out[..., 1], out[..., 2])
    # With both shares at 0 the extra draws are skipped: the paper's synthesis, sample for sample.
    plain = SynthesisParams(anomaly_prob=1.0)
    for seed in range(5):
        a = synthesize(image, source, plain, np.random.default_rng(seed))
        b = synthesize(image, source, SynthesisParams(anomaly_prob=1.0, rotate_prob=0.0), np.random.default_rng(seed))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_dark_cracks_darken_only_along_the_crack() -> None:
    image = np.random.default_rng(3).uniform(0.3, 0.7, size=(64, 64, 3)).astype(np.float32)
    source = make_source("fractal")
    dark = SynthesisParams(anomaly_prob=1.0, crack_prob=1.0, crack_fill="dark")
    filled = 0
    for seed in range(10):
        out, mask = synthesize(image, source, dark, np.random.default_rng(seed))
        assert out.dtype == np.float32 and out.shape == image.shape
        assert np.all(out <= image + 1e-6)  # a groove only darkens
        if not mask.any():
            continue
        filled += 1
        assert _surviving_erosion(mask, 5) < 0.2
        ratio = out[mask > 0] / image[mask > 0]
        assert ratio.max() <= 0.7 + 1e-5 and ratio.min() >= 0.2 - 1e-5  # 30-80 % darker inside
        # Grey stays grey (one factor for the three channels), and away from the crack nothing changes.
        assert np.allclose(ratio[:, 0], ratio[:, 1]) and np.allclose(ratio[:, 1], ratio[:, 2])
        far = cv2.erode((1 - mask).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        assert np.array_equal(out[far], image[far])
    assert filled >= 6
    with pytest.raises(ConfigError, match="crack_fill='paint'"):
        tiny_run(32, crack_prob=0.2, crack_fill="paint")


def test_rotation_turns_good_images_and_keeps_samples_reproducible() -> None:
    imgs = random_uint8(3, 32).permute(0, 2, 3, 1).contiguous().numpy()
    plain = SynthesisDataset(imgs, make_source("fractal"), SynthesisParams(anomaly_prob=0.0), seed=4)
    turned = SynthesisDataset(imgs, make_source("fractal"), SynthesisParams(anomaly_prob=0.0, rotate_prob=1.0), seed=4)
    for g in range(6):
        assert not torch.equal(plain[g]["image"], turned[g]["image"])
        assert turned[g]["image"].shape == (3, 32, 32)
        assert torch.equal(turned[g]["image"], turned[g]["augmented"])  # no anomaly: the pair is the turned image
    again = SynthesisDataset(imgs, make_source("fractal"), SynthesisParams(anomaly_prob=0.0, rotate_prob=1.0), seed=4)
    assert torch.equal(again[5]["image"], turned[5]["image"])


def test_variant_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"crack_prob.*patch_prob.*at most 1"):
        tiny_run(32, crack_prob=0.6, patch_prob=0.6)
    with pytest.raises(ConfigError, match=r"rotate_prob=1\.5"):
        tiny_run(32, rotate_prob=1.5)
    with pytest.raises(ConfigError, match="val_patience=0"):
        tiny_run(32, val_every=5, val_patience=0)
    det = DraemDetector(tiny_run(32, steps=2, val_every=1, val_images=5), torch.device("cpu"))
    with pytest.raises(ConfigError, match="val_images=5 leaves fewer than 2"):
        det.fit(random_uint8(6, 32), TrainContext())


def test_training_with_the_variants_runs() -> None:
    det = DraemDetector(
        tiny_run(32, steps=3, crack_prob=0.3, patch_prob=0.3, rotate_prob=0.3, crack_fill="dark"), torch.device("cpu")
    )
    summary = det.fit(random_uint8(6, 32), TrainContext())
    assert summary.steps == 3 and np.isfinite(summary.final_loss)


def _validation_ap(det: DraemDetector, images: torch.Tensor, n_val: int) -> float:
    """The held-out synthetic set that fit() builds, scored with the detector's current weights."""
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    train_idx, val_idx = split_validation(len(nhwc), n_val, det.run_config.common.seed)
    val = SyntheticValidationSet(nhwc[val_idx], *det._synthesis_recipe(nhwc[train_idx]), det.run_config.common.seed)
    det.model.eval()
    return val.pixel_ap(det.model, torch.device("cpu"))


def test_synthetic_validation_stops_early_and_keeps_the_best_weights() -> None:
    images = random_uint8(12, 32)
    # lr so small that the weights barely move: the validation AP stalls, so patience 2 must stop it.
    det = DraemDetector(
        tiny_run(32, steps=200, lr=1e-9, val_every=2, val_images=4, val_patience=2), torch.device("cpu")
    )
    summary = det.fit(images, TrainContext())
    val = summary.details["validation"]
    assert summary.steps < 200 and val["stopped_early"]
    assert summary.steps == val["history"][-1][0] and len(val["history"]) >= 3
    assert "stopped early" in summary.schedule_note and f"step {val['best_step']}" in summary.schedule_note
    assert val["best_pixel_ap"] == max(ap for _, ap in val["history"])
    assert val["images"] == 4 and val["samples"] == 16  # each held-out image clean + 3 anomalies
    # The model ends with the weights of the best evaluation, not those of the last step.
    assert _validation_ap(det, images, 4) == pytest.approx(val["best_pixel_ap"], abs=1e-4)


def test_synthetic_validation_without_a_stop_runs_the_whole_schedule() -> None:
    det = DraemDetector(tiny_run(32, steps=6, val_every=3, val_images=4, val_patience=10), torch.device("cpu"))
    summary = det.fit(random_uint8(10, 32), TrainContext())
    val = summary.details["validation"]
    assert summary.steps == 6 and not val["stopped_early"]
    assert [s for s, _ in val["history"]] == [3, 6]


def test_early_stop_state_survives_a_resume() -> None:
    images = random_uint8(10, 32)
    saved: dict[int, bytes] = {}

    def on_checkpoint(state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        saved[state["step"]] = buf.getvalue()

    cfg = {"steps": 8, "val_every": 2, "val_images": 4, "val_patience": 10}
    full = DraemDetector(tiny_run(32, **cfg), torch.device("cpu"))
    summary = full.fit(images, TrainContext(on_checkpoint=on_checkpoint, checkpoint_every_s=0.0))
    state = torch.load(io.BytesIO(saved[4]), weights_only=True)
    assert [s for s, _ in state["validation"]["history"]] == [2, 4]
    resumed = DraemDetector(tiny_run(32, **cfg), torch.device("cpu"))
    summary2 = resumed.fit(images, TrainContext(resume_state=state))
    h1, h2 = summary.details["validation"]["history"], summary2.details["validation"]["history"]
    assert [s for s, _ in h2] == [2, 4, 6, 8]
    np.testing.assert_allclose([v for _, v in h2], [v for _, v in h1], atol=1e-4)
    assert summary2.details["validation"]["best_step"] == summary.details["validation"]["best_step"]
