"""Tiled scoring: tile layout, seam-free stitching, defects on tile borders, training tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from surfaceinspect.config import CommonConfig, MethodConfig, RunConfig, TilingConfig
from surfaceinspect.data.tiling import TiledPredictor, blend_window, load_training_tiles, tile_origins
from surfaceinspect.detectors.base import Detector, Prediction


class MeanDeviation(Detector):
    """Map = |pixel - 0.5| smoothed a little, score = its max: enough to find a bright spot."""

    name = "meandev"
    config_cls = MethodConfig

    def fit(self, images, context):  # pragma: no cover - not trained in these tests
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> Prediction:
        assert tuple(images.shape[-2:]) == self.input_size  # tiles always have the network's size
        m = (images.mean(1, keepdim=True) - 0.5).abs()
        m = F.avg_pool2d(m, 5, stride=1, padding=2, count_include_pad=False)[:, 0]
        return Prediction(scores=m.flatten(1).amax(1), maps=m)

    def state_dict(self):  # pragma: no cover
        return {}

    def load_state_dict(self, state):  # pragma: no cover
        pass


def detector(tile: int | list[int] = 64) -> Detector:
    run = RunConfig("meandev", "test", CommonConfig(image_size=tile), MethodConfig())
    return MeanDeviation(run, torch.device("cpu"))


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(1000, 256, 0.25), (256, 256, 0.5), (300, 256, 0.0), (10, 64, 0.3)]
)
def test_tiles_cover_the_image_with_the_overlap_asked_for(length, tile, overlap):
    starts = tile_origins(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == max(0, length - tile)
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered[:length].all()
    steps = np.diff(starts)
    assert (steps <= tile * (1 - overlap) + 1).all() and (steps > 0).all()


def test_window_is_one_inside_and_tapers_at_the_margins():
    w = blend_window(64, 32, 0.25)
    assert w.shape == (64, 32) and float(w[32, 16]) == 1.0
    assert 0 < float(w[0, 0]) < 0.05 and bool(np.all(w > 0))


def test_constant_image_gives_a_seam_free_constant_map():
    image = np.full((3, 200, 700), 0.8, np.float32)
    score, stitched = TiledPredictor(detector(64), TilingConfig(enabled=True, overlap=0.25), 8).predict(image)
    assert stitched.shape == (200, 700)
    np.testing.assert_allclose(stitched, 0.3, atol=1e-5)
    assert score == pytest.approx(0.3, abs=1e-5)


def test_defect_on_a_tile_border_is_found_where_it_is():
    image = np.full((3, 128, 512), 0.5, np.float32)
    starts = tile_origins(512, 64, 0.25)
    border = starts[3] + 64  # right edge of a tile, inside its neighbour's overlap
    image[:, 60:66, border - 3 : border + 3] = 1.0
    predictor = TiledPredictor(detector(64), TilingConfig(enabled=True, overlap=0.25), 4)
    score, stitched = predictor.predict(image)
    clean_score, clean_map = predictor.predict(np.full((3, 128, 512), 0.5, np.float32))
    y, x = np.unravel_index(np.argmax(stitched), stitched.shape)
    assert abs(y - 63) <= 3 and abs(x - border) <= 3
    assert score > 0.3 and clean_score < 1e-6 and clean_map.max() < 1e-6


def test_scaled_tiling_returns_maps_at_the_image_resolution():
    image = np.full((3, 300, 1000), 0.5, np.float32)
    image[:, 140:160, 480:520] = 1.0
    score, stitched = TiledPredictor(detector([64, 128]), TilingConfig(enabled=True, scale=0.5), 8).predict(image)
    assert stitched.shape == (300, 1000) and score > 0.3
    y, x = np.unravel_index(np.argmax(stitched), stitched.shape)
    assert 130 <= y <= 170 and 470 <= x <= 530


def test_very_long_strip_is_scored_tile_by_tile():
    """A 16000 x 2048 line-scan strip: the map comes back at full size, the tiles a batch at a time."""
    image = np.full((3, 2048, 16000), 0.5, np.float32)
    image[:, 1000:1010, 12345:12355] = 1.0
    score, stitched = TiledPredictor(detector(256), TilingConfig(enabled=True, overlap=0.125), 16).predict(image)
    assert stitched.shape == (2048, 16000) and score > 0.3
    y, x = np.unravel_index(np.argmax(stitched), stitched.shape)
    assert abs(y - 1005) <= 5 and abs(x - 12350) <= 5


def test_training_tiles_are_bounded_and_reproducible(tmp_path):
    from surfaceinspect.data.synthetic import make_dataset

    data = make_dataset(tmp_path / "d", n_train=6, n_test_good=1, n_test_defect_per_type=1, size=160, seed=0)
    paths = sorted((data / "train" / "good").glob("*.png"))
    tiling = TilingConfig(enabled=True, overlap=0.5, max_train_tiles=12)
    tiles, ok, failures = load_training_tiles(paths, (64, 64), tiling, workers=2, seed=3)
    again, _, _ = load_training_tiles(paths, (64, 64), tiling, workers=0, seed=3)
    assert tiles.dtype == torch.uint8 and tiles.shape == (12, 3, 64, 64)
    assert torch.equal(tiles, again) and len(ok) == 6 and not failures
    (tmp_path / "bad.png").write_bytes(b"not an image")
    _, ok2, failures2 = load_training_tiles([*paths[:2], tmp_path / "bad.png"], (64, 64), tiling, 0, 3)
    assert len(ok2) == 2 and failures2[0][0].name == "bad.png"
