"""Shared fixtures: generated datasets, an isolated runs folder, the toy detector."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# Real defect data (../shared/data beside the checkout, or $SURFACEINSPECT_DATA); tests skip without it.
SHARED_DATA = Path(os.environ.get("SURFACEINSPECT_DATA") or TESTS_DIR.parent.parent / "shared" / "data")
sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path_factory, monkeypatch):
    """Every test gets its own runs folder (never the user's)."""
    home = tmp_path_factory.mktemp("si_home")
    monkeypatch.setenv("SURFACEINSPECT_HOME", str(home))
    return home / "runs"


@pytest.fixture(autouse=True)
def single_torch_thread():
    """One torch thread per test (the engine sets threads per command; tests calling fit directly do not)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def toy_method(tmp_path_factory, monkeypatch):
    """Register the toy detector (a plug-in) with cpu and paper profiles; returns its method name."""
    from surfaceinspect.config import PROFILES_ENV
    from surfaceinspect.detectors import PLUGINS_ENV

    profiles = tmp_path_factory.mktemp("profiles")
    for name in ("cpu", "paper"):
        (profiles / f"toy-{name}.yaml").write_text(
            "method: toy\ncommon:\n  image_size: 64\n  batch_size: 4\n  workers: 0\n"
            "  calibration:\n    min_images: 4\n    fraction: 0.2\ntoy:\n  epochs: 2\n"
        )
    # registered as a plug-in, as a method from outside the package would be (no file of it edited);
    # the variables reach every process a command starts (benchmark's workers included)
    monkeypatch.setenv(PROFILES_ENV, str(profiles))
    monkeypatch.setenv(PLUGINS_ENV, "toy=toy_detector:ToyDetector")
    return "toy"


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A small MVTec-layout dataset with obvious defects (generated once per session)."""
    from surfaceinspect.data.synthetic import make_dataset

    return make_dataset(
        tmp_path_factory.mktemp("synthetic"), n_train=30, n_test_good=8, n_test_defect_per_type=3, size=96, seed=1
    )


def shared_dataset(name: str) -> Path:
    """Path of a real dataset (``mtd``, ``mvtec_bottle``, ``dagm_class1``), or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (real-data check)")
    return path


@pytest.fixture
def real_dataset():
    """``real_dataset("mtd")``: the path of a real dataset, or the test is skipped when it is absent."""
    return shared_dataset
