"""Non-square inputs (H != W) through both detectors: synthesis, features, fit, predict, save/load, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_csflow import make_detector as make_csflow
from test_draem import tiny_run
from typer.testing import CliRunner

from surfaceinspect.cli import app
from surfaceinspect.detectors.base import Detector, TrainContext
from surfaceinspect.detectors.csflow import backbones as bb
from surfaceinspect.detectors.draem import DraemDetector
from surfaceinspect.detectors.draem.perlin import perlin_mask, perlin_noise
from surfaceinspect.detectors.draem.sources import crop_to_aspect, make_source
from surfaceinspect.detectors.draem.synthesis import SynthesisDataset, SynthesisParams, synthesize
from surfaceinspect.errors import EXIT_OK
from surfaceinspect.storage import modeldir


def strips(n: int, hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, H, W): a horizontal gradient with noise, so left and right differ."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    ramp = torch.linspace(0.2, 0.8, w).expand(h, w)
    img = ramp + 0.1 * torch.rand(n, 3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def transitions(field: np.ndarray) -> tuple[float, float]:
    """Mean absolute difference of neighbouring pixels, along y and along x (for a mask: share that differ)."""
    return float(np.abs(np.diff(field, axis=0)).mean()), float(np.abs(np.diff(field, axis=1)).mean())


# ---------------------------------------------------------------------------------------------- DRAEM synthesis


@pytest.mark.parametrize("hw", [(32, 256), (200, 64)])
def test_perlin_masks_have_the_requested_shape(hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    masks = [perlin_mask(hw, rng, (0, 5), 0.5) for _ in range(60)]
    assert all(m.shape == hw and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    fractions = np.array([m.mean() for m in masks])
    assert ((fractions > 0) & (fractions < 1)).mean() > 0.6  # most masks neither empty nor full
    assert 0.01 < np.median(fractions) < 0.5


@pytest.mark.parametrize("hw", [(32, 256), (256, 32)])
def test_perlin_cells_are_square_in_pixels_on_strips(hw: tuple[int, int]) -> None:
    # Equal periods on both axes give round blobs whatever the aspect (periods count over the short
    # side); counted per side, the cells of a 1:8 strip would be 8x longer along it.
    for seed in range(3):
        noise = perlin_noise(hw, (4.0, 4.0), np.random.default_rng(seed))
        ty, tx = transitions(noise)
        assert 0.7 < tx / ty < 1.4


def test_square_size_as_int_or_pair_gives_the_same_mask() -> None:
    for seed in range(5):
        a = perlin_mask(48, np.random.default_rng(seed))
        b = perlin_mask((48, 48), np.random.default_rng(seed))
        assert np.array_equal(a, b)


def test_crop_to_aspect_is_centred_and_keeps_matching_images() -> None:
    img = np.arange(40 * 60).reshape(40, 60)
    assert crop_to_aspect(img, (20, 30)) is img
    wide = crop_to_aspect(img, (10, 60))  # 1:6 from 2:3 -> full width, 10 rows from the middle
    assert wide.shape == (10, 60) and wide[0, 0] == img[15, 0]
    tall = crop_to_aspect(img, (80, 40))  # 2:1 -> full height, 20 columns from the middle
    assert tall.shape == (40, 20) and tall[0, 0] == img[0, 20]


@pytest.mark.parametrize("name", ["fractal", "structured", "self"])
def test_builtin_sources_give_non_square_textures(name: str) -> None:
    imgs = strips(3, (24, 72)).permute(0, 2, 3, 1).numpy()
    src = make_source(name, imgs)
    for seed in range(6):  # several seeds: the structured source has six pattern kinds
        tex = src.sample(np.random.default_rng(seed), (20, 90))
        assert tex.shape == (20, 90, 3) and tex.dtype == np.float32
        assert tex.min() >= 0.0 and tex.max() <= 1.0


def test_folder_source_crops_photos_to_a_strip_instead_of_smearing_them(tmp_path) -> None:
    # A 60 x 60 checkerboard of 10 px squares: a 1:4 strip of it keeps square squares.
    yy, xx = np.mgrid[0:60, 0:60]
    board = (((yy // 10) + (xx // 10)) % 2 * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "board.png"), np.repeat(board[..., None], 3, axis=2))
    tex = make_source(str(tmp_path)).sample(np.random.default_rng(0), (30, 120))
    assert tex.shape == (30, 120, 3)
    ty, tx = transitions((tex[..., 0] > 0.5).astype(np.float32))
    assert 0.7 < tx / ty < 1.4  # squashing the whole photo into the strip would give tx / ty = 1/4


def test_synthesized_anomaly_lies_inside_a_non_square_image() -> None:
    image = np.full((40, 120, 3), 0.5, np.float32)
    source, params = make_source("fractal"), SynthesisParams(anomaly_prob=1.0)
    changed = 0
    for seed in range(10):
        out, mask = synthesize(image, source, params, np.random.default_rng(seed))
        assert out.shape == image.shape and mask.shape == (40, 120)
        assert np.array_equal(out[mask == 0], image[mask == 0])  # nothing changes outside the mask
        changed += int(mask.any() and not np.allclose(out[mask == 1], 0.5))
    assert changed >= 5


def test_synthesis_dataset_yields_non_square_samples() -> None:
    imgs = strips(4, (24, 64)).permute(0, 2, 3, 1).numpy()
    ds = SynthesisDataset(imgs, make_source("self", imgs), SynthesisParams(anomaly_prob=1.0), seed=1)
    for g in range(6):
        sample = ds[g]
        assert sample["image"].shape == sample["augmented"].shape == (3, 24, 64)
        assert sample["mask"].shape == (1, 24, 64)


# ---------------------------------------------------------------------------------------------- detectors


def assert_round_trip(det: Detector, fresh: Detector, probe: torch.Tensor, tmp_path: Path) -> None:
    """Predictions are finite, (B, H, W), and identical after saving and loading the weights."""
    before = det.predict(probe)
    b, _, h, w = probe.shape
    assert before.scores.shape == (b,) and before.maps.shape == (b, h, w)
    assert torch.isfinite(before.scores).all() and torch.isfinite(before.maps).all()
    save_file(det.state_dict(), str(tmp_path / "model.safetensors"))
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    after = fresh.predict(probe)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


@pytest.mark.parametrize("hw", [[32, 96], [64, 32]])
def test_draem_fits_and_predicts_non_square(hw: list[int], tmp_path) -> None:
    run = tiny_run(hw, steps=3, anomaly_prob=1.0)
    det = DraemDetector(run, torch.device("cpu"))
    assert det.input_size == tuple(hw)
    summary = det.fit(strips(6, tuple(hw)), TrainContext())
    assert summary.steps == 3 and np.isfinite(summary.final_loss)
    probe = strips(2, tuple(hw), seed=1).float() / 255
    assert_round_trip(det, DraemDetector(tiny_run(hw, steps=3), torch.device("cpu")), probe, tmp_path)


def test_csflow_multiscale_features_halve_each_side() -> None:
    trunk = bb.build_trunk("efficientnet_lite0", 3, None, pretrained=False)
    extractor = bb.MultiScaleFeatures(trunk, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), n_scales=3)
    with torch.inference_mode():
        feats = extractor(torch.rand(1, 3, 64, 160))
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 20), (4, 10), (2, 5)]  # stride 8, then 1/2, 1/4


@pytest.mark.parametrize("options", [{}, {"map_mode": "product", "feature_norm": "channel", "feature_cache": "disk"}])
def test_csflow_fits_and_predicts_non_square(options: dict, tmp_path) -> None:
    hw = [64, 160]
    det = make_csflow(hw, epochs=1, **options)
    summary = det.fit(strips(6, (64, 160)), TrainContext())
    assert summary.steps == 1 and np.isfinite(summary.final_loss)
    probe = strips(2, (64, 160), seed=1).float() / 255
    assert_round_trip(det, make_csflow(hw, epochs=1, **options), probe, tmp_path)


def test_csflow_map_peaks_where_the_defect_is_on_a_strip() -> None:
    # Maps are aligned with the image: a swapped or squashed axis would move the peak.
    det = make_csflow([64, 160], epochs=2, feature_norm="channel")
    det.fit(strips(8, (64, 160)), TrainContext())
    probe = strips(2, (64, 160), seed=3).float() / 255
    probe[0, :, 20:36, 120:136] = 0.0  # dark square, right
    probe[1, :, 30:46, 10:26] = 1.0  # bright square, left
    for amap, (y0, x0) in zip(det.predict(probe).maps, [(20, 120), (30, 10)], strict=True):
        y, x = divmod(int(amap.argmax()), 160)
        assert y0 - 8 <= y < y0 + 24 and x0 - 8 <= x < x0 + 24


# ---------------------------------------------------------------------------------------------- CLI


TINY_CLI = {
    "draem": [
        "--set",
        "draem.steps=3",
        "--set",
        "draem.recon_width=8",
        "--set",
        "draem.disc_width=4",
        "--set",
        "draem.recon_levels=3",
        "--set",
        "draem.disc_levels=3",
    ],
    "csflow": [
        "--epochs",
        "1",
        "--set",
        "csflow.feature_stage=3",
        "--set",
        "csflow.hidden_channels=16",
        "--set",
        "csflow.n_blocks=2",
        "--set",
        "csflow.kernel_sizes=[3,5]",
    ],
}


@pytest.fixture(scope="module")
def strip_dataset(tmp_path_factory) -> Path:
    """Strips of 48 x 144 px (1:3): 8 good ones to train on, 3 to score."""
    root = tmp_path_factory.mktemp("strips")
    for folder, n, seed in (("train", 8, 0), ("test", 3, 1)):
        (root / folder).mkdir()
        for i, img in enumerate(strips(n, (48, 144), seed=seed)):
            cv2.imwrite(str(root / folder / f"{i:02d}.png"), img.permute(1, 2, 0).numpy()[..., ::-1])
    return root


@pytest.mark.parametrize(
    ("method", "geometry", "stored_size"),
    [
        ("draem", ["--image-size", "32x96"], [32, 96]),
        ("draem", ["--image-size", "keep:96"], [32, 96]),  # the strips are 1:3
        ("draem", ["--image-size", "32", "--set", "common.tiling.enabled=true"], 32),  # square tiles of the strips
        ("csflow", ["--image-size", "64x192"], [64, 192]),
    ],
)
def test_cli_train_score_heatmap_on_strips(
    method: str, geometry: list[str], stored_size: object, strip_dataset: Path, tmp_path
) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--no-export",
            "-m",
            method,
            str(strip_dataset / "train"),
            "--threads",
            "1",
            "--workers",
            "0",
            "-q",
            *geometry,
            "--set",
            "common.time_budget_min=0",
            "--set",
            "common.calibration.min_images=3",
            *TINY_CLI[method],
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == EXIT_OK, result.output
    meta = json.loads((modeldir.latest_run() / "metadata.json").read_text())
    assert meta["config"]["common"]["image_size"] == stored_size

    out_csv = tmp_path / "scores.csv"
    result = runner.invoke(
        app, ["score", str(strip_dataset / "test"), "--output", str(out_csv)], catch_exceptions=False
    )
    assert result.exit_code in (0, 1), result.output
    rows = out_csv.read_text().splitlines()[1:]
    assert len(rows) == 3
    result = runner.invoke(
        app,
        ["heatmap", str(strip_dataset / "test"), "--out", str(tmp_path / "heat"), "--save-maps", "-q"],
        catch_exceptions=False,
    )
    assert result.exit_code in (0, 1), result.output
    for i in range(3):
        overlay = cv2.imread(str(tmp_path / "heat" / f"{i:02d}.png"))
        amap = np.load(tmp_path / "heat" / f"{i:02d}.npy")
        assert overlay.shape[:2] == amap.shape == (48, 144) and np.isfinite(amap).all()
