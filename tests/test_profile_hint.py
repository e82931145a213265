"""train names the `texture` profile when a `cpu` profile shrinks texture-like training images 2x or more."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from rich.console import Console

from surfaceinspect import engine
from surfaceinspect.detectors import available_methods
from surfaceinspect.profiles import resolve_run_config
from surfaceinspect.ui import Reporter


def write_images(folder: Path, n: int, height: int, width: int, kind: str = "texture") -> list[Path]:
    """``texture``: independent noise; ``object``: the same bright disc on every image, slightly noisy."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        if kind == "texture":
            image = rng.integers(0, 255, (height, width), dtype=np.uint8)
        else:
            image = np.full((height, width), 60, np.uint8)
            cv2.circle(image, (width // 2, height // 2), min(height, width) // 3, 200, -1)
            image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def hint_for(method: str, profile: str, paths: list[Path], *sets: str) -> tuple[str | None, str]:
    run_config = resolve_run_config(
        method=method, profile=profile, config_file=None, common_flags={"device": "cpu"}, sets=list(sets)
    )
    buffer = io.StringIO()
    hint = engine.suggest_profile(run_config, paths, Reporter(Console(file=buffer, width=300)))
    return hint, buffer.getvalue()


@pytest.mark.parametrize("method", available_methods())
def test_cpu_profile_on_large_texture_images_names_texture(tmp_path, method):
    paths = write_images(tmp_path / "good", 6, 512, 640)
    hint, printed = hint_for(method, "cpu", paths)
    assert hint is not None and "--profile texture" in hint and "512x640" in hint and "look like a texture" in hint
    assert "--profile texture" in printed


def test_too_few_images_to_tell_still_get_the_hint(tmp_path):
    hint, _ = hint_for("draem", "cpu", write_images(tmp_path / "good", 3, 512, 512, "object"))
    assert hint is not None and "look like a texture" not in hint


@pytest.mark.parametrize(
    ("profile", "size", "sets", "kind"),
    [
        ("cpu", (300, 300), (), "texture"),  # shrunk less than 2x (to the cpu profile's 256 px): no hint
        ("texture", (512, 512), (), "texture"),  # already the texture profile
        ("cpu", (512, 512), ("common.tiling.enabled=true",), "texture"),  # tiles keep the pixels
        ("cpu", (512, 512), (), "object"),  # whole objects: the texture profile scored lower there
    ],
)
def test_no_hint_when_the_detail_is_kept_or_the_images_show_an_object(tmp_path, profile, size, sets, kind):
    paths = write_images(tmp_path / "good", 6, *size, kind)
    hint, printed = hint_for("csflow", profile, paths, *sets)
    assert hint is None and printed == ""


def test_shared_structure_tells_textures_from_objects(tmp_path):
    textures = write_images(tmp_path / "t", 8, 96, 128)
    objects = write_images(tmp_path / "o", 8, 96, 128, "object")
    assert engine.shared_structure(textures) < 0.05
    assert engine.shared_structure(objects) > 0.9
    assert engine.shared_structure(textures[:3]) is None  # too few to tell
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert engine.shared_structure([broken, *textures[:3]]) is None  # unreadable files do not count


@pytest.mark.parametrize(("name", "texture"), [("dagm_class1", True), ("mvtec_bottle", False), ("mtd", False)])
def test_shared_structure_on_real_data(real_dataset, name, texture):
    folder = real_dataset(name) / "train" / "good"
    value = engine.shared_structure(sorted(folder.iterdir()))
    # The profile the benchmarks found better on each set (BENCHMARKS.md sections 7 and 9).
    assert (value < engine._TEXTURE_STRUCTURE) == texture
