"""train names the `texture` profile when a `cpu` profile shrinks the training images 2x or more."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console

from surfaceinspect import engine
from surfaceinspect.config import resolve_run_config
from surfaceinspect.ui import Reporter


def write_images(folder: Path, n: int, height: int, width: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (height, width), dtype=np.uint8))
        paths.append(path)
    return paths


def hint_for(method: str, profile: str, paths: list[Path], *sets: str) -> tuple[str | None, str]:
    run_config = resolve_run_config(
        method=method, profile=profile, config_file=None, common_flags={"device": "cpu"}, sets=list(sets)
    )
    buffer = io.StringIO()
    hint = engine.suggest_profile(run_config, paths, Reporter(Console(file=buffer, width=300)))
    return hint, buffer.getvalue()


@pytest.mark.parametrize("method", ["draem", "csflow"])
def test_cpu_profile_on_large_images_names_texture(tmp_path, method):
    paths = write_images(tmp_path / "good", 3, 512, 640)
    hint, printed = hint_for(method, "cpu", paths)
    assert hint is not None and "--profile texture" in hint and "512x640" in hint
    assert "--profile texture" in printed


@pytest.mark.parametrize(
    ("profile", "size", "sets"),
    [
        ("cpu", (300, 300), ()),  # shrunk less than 2x (to the cpu profile's 256 px): no hint
        ("texture", (512, 512), ()),  # already the texture profile
        ("cpu", (512, 512), ("common.tiling.enabled=true",)),  # tiles keep the pixels
    ],
)
def test_no_hint_when_the_detail_is_kept(tmp_path, profile, size, sets):
    paths = write_images(tmp_path / "good", 3, *size)
    hint, printed = hint_for("csflow", profile, paths, *sets)
    assert hint is None and printed == ""
