"""DRAEM training modes: random crops of full-size images, bf16 autocast (generated data only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_draem import random_uint8, tiny_run

from surfaceinspect.detectors.base import TrainContext
from surfaceinspect.detectors.draem import DraemConfig, DraemDetector
from surfaceinspect.detectors.draem.detector import training_dtype
from surfaceinspect.detectors.draem.sources import make_source
from surfaceinspect.detectors.draem.synthesis import SynthesisDataset, SynthesisParams
from surfaceinspect.errors import ConfigError


def _window_of(image: np.ndarray, window: np.ndarray) -> bool:
    """Whether ``window`` (h, w, C) is a sub-array of ``image`` (H, W, C)."""
    h, w = window.shape[:2]
    return any(
        np.array_equal(image[y : y + h, x : x + w], window)
        for y in range(image.shape[0] - h + 1)
        for x in range(image.shape[1] - w + 1)
    )


def test_crop_samples_are_random_windows_of_the_full_images() -> None:
    imgs = random_uint8(3, 32).permute(0, 2, 3, 1).numpy()
    params = SynthesisParams(anomaly_prob=0.0)
    ds = SynthesisDataset(imgs, make_source("fractal"), params, seed=5, crop=16)
    offsets = set()
    for g in range(12):
        sample = ds[g]
        assert sample["image"].shape == (3, 16, 16) and sample["mask"].shape == (1, 16, 16)
        window = np.rint(sample["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert any(_window_of(img, window) for img in imgs)
        offsets.add(float(sample["image"].sum()))
    assert len(offsets) > 6  # windows differ from sample to sample
    again = SynthesisDataset(imgs, make_source("fractal"), params, seed=5, crop=16)
    assert torch.equal(again[7]["image"], ds[7]["image"])  # a pure function of seed and index
    # Without a crop the samples are the whole images, as before.
    assert SynthesisDataset(imgs, make_source("fractal"), params, seed=5)[0]["image"].shape == (3, 32, 32)


def test_crop_trained_detector_scores_whole_images() -> None:
    det = DraemDetector(tiny_run(32, steps=3, train_crop=16), torch.device("cpu"))
    summary = det.fit(random_uint8(6, 32), TrainContext())
    assert summary.steps == 3 and summary.final_loss is not None and np.isfinite(summary.final_loss)
    pred = det.predict(torch.rand(2, 3, 32, 32))
    assert pred.maps.shape == (2, 32, 32) and pred.scores.shape == (2,)
    # A non-square image is scored whole too: the map has the image's size.
    assert det.predict(torch.rand(1, 3, 32, 48)).maps.shape == (1, 32, 48)


def test_crop_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="train_crop=6"):
        tiny_run(32, train_crop=6)  # not a multiple of 4 (3 levels)
    with pytest.raises(ConfigError, match="train_crop=-4"):
        tiny_run(32, train_crop=-4)
    det = DraemDetector(tiny_run(32, steps=1, train_crop=48), torch.device("cpu"))
    with pytest.raises(ConfigError, match="larger than the 32x32 training inputs"):
        det.fit(random_uint8(4, 32), TrainContext())


def test_training_precision_choice() -> None:
    cpu = torch.device("cpu")
    assert training_dtype("auto", cpu) == torch.float32  # bf16 on a CPU is slow emulation unless asked for
    assert training_dtype("fp32", cpu) == torch.float32
    assert training_dtype("bf16", cpu) == torch.bfloat16
    assert training_dtype("fp32", torch.device("cuda")) == torch.float32
    with pytest.raises(ConfigError, match="train_precision='half'"):
        DraemConfig(train_precision="half").validate(tiny_run(32).common)


def test_bf16_training_keeps_fp32_weights_and_records_precision() -> None:
    det = DraemDetector(tiny_run(32, steps=2, train_precision="bf16"), torch.device("cpu"))
    summary = det.fit(random_uint8(4, 32), TrainContext())
    assert summary.details["train_precision"] == "bf16" and np.isfinite(summary.final_loss)
    assert all(p.dtype == torch.float32 for p in det.model.parameters())
    fp32 = DraemDetector(tiny_run(32, steps=2), torch.device("cpu"))
    assert fp32.fit(random_uint8(4, 32), TrainContext()).details["train_precision"] == "fp32"
