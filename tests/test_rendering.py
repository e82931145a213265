"""Overlays, index.html and ROC plots."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from surfaceinspect.analysis import rendering
from surfaceinspect.analysis.rendering import colorize, plot_roc, render_overlay, save_png, write_index_html


def _textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gray = np.clip(110 + 25 * np.sin(np.arange(w) / 7.0)[None, :] + rng.normal(0, 6, (h, w)), 0, 255)
    return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)


def _band_height(out: np.ndarray, verdict: str) -> int:
    """Rows at the top whose first column carries the verdict accent colour (the banner)."""
    accent = np.array(rendering._DEFECT_RGB if verdict == "defect" else rendering._GOOD_RGB)
    rows = np.all(out[:, 0] == accent, axis=1)
    return int(np.argmin(rows)) if not rows.all() else len(rows)


def test_colorize_calm_below_hot_above_threshold():
    ramp = np.linspace(0, 1, 101, dtype=np.float32)[None, :]
    rgb = colorize(ramp).astype(int)[0]
    assert rgb.shape == (101, 3)
    below, above = rgb[:50], rgb[51:]
    assert np.all(below[:, 2] > below[:, 0]), "values below 0.5 must be blue-ish (calm)"
    assert np.all(above[:, 0] > above[:, 2]), "values above 0.5 must be red/yellow (hot)"
    # No per-image normalisation: a pixel's colour depends only on its own value.
    np.testing.assert_array_equal(colorize(np.full((3, 3), 0.3))[0, 0], rgb[30])


@pytest.mark.parametrize(("h", "w"), [(101, 77), (37, 53), (1, 1), (255, 640)])
def test_overlay_keeps_input_size(h, w):
    out = render_overlay(_textured(h, w), np.full((h, w), 0.7), "score 0.83  DEFECT", "defect")
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


def test_good_image_stays_close_to_input():
    img = _textured(200, 160)
    out = render_overlay(img, np.full((200, 160), 0.1), "score 0.12  GOOD", "good")
    band = _band_height(out, "good")
    assert 10 <= band < 60
    # Below the banner nothing is tinted or outlined.
    np.testing.assert_array_equal(out[band:], img[band:])


def test_defect_region_is_coloured_and_outlined():
    img = np.full((120, 150, 3), 100, np.uint8)
    m = np.full((120, 150), 0.1, np.float32)
    m[60:90, 50:100] = 0.9
    out = render_overlay(img, m, "score 0.91  DEFECT", "defect").astype(int)
    inside = out[68:82, 58:92]
    assert np.all(inside[..., 0] > inside[..., 2] + 40), "hot region must look red/orange"
    # White outline pixels along the region border, none far from it.
    white = np.all(out > 240, axis=2)
    assert white[55:95, 45:105].sum() > 50
    assert not white[30:50].any() and not white[100:].any()
    # Far from the region the part is untouched.
    np.testing.assert_array_equal(out[100:, :], 100)


def test_overlay_resizes_map_and_validates():
    out = render_overlay(_textured(90, 130), np.zeros((32, 32)), "x", "good")
    assert out.shape == (90, 130, 3)
    with pytest.raises(ValueError, match="verdict"):
        render_overlay(_textured(10, 10), np.zeros((10, 10)), "x", "bad")
    gray = render_overlay(_textured(20, 30)[:, :, 0], np.zeros((20, 30)), "x", "good")
    assert gray.shape == (20, 30, 3)


def test_banner_font_scales_with_image_size():
    small = render_overlay(_textured(100, 100), np.zeros((100, 100)), "score 0.83  DEFECT", "defect")
    large = render_overlay(_textured(2000, 2000), np.zeros((2000, 2000)), "score 0.83  DEFECT", "defect")
    h_small, h_large = _band_height(small, "defect"), _band_height(large, "defect")
    assert 12 <= h_small <= 45  # legible but not covering the part
    assert h_large >= 4 * h_small
    # Text is actually drawn: light pixels inside the band.
    assert (small[:h_small, 5:].max(axis=2) > 200).sum() > 20


def test_save_png_roundtrip(tmp_path):
    img = _textured(33, 47)
    img[0, 0] = (255, 0, 0)
    path = tmp_path / "sub" / "o.png"
    save_png(path, img)
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, img)
    assert [p.name for p in path.parent.iterdir()] == ["o.png"]  # no temp file left


def test_index_html_order_escaping_counts(tmp_path):
    entries = [
        {
            "image": "overlays/a.png",
            "source": "good/a.png",
            "score": 0.2,
            "score_normalized": 0.3,
            "verdict": "good",
            "n_regions": 0,
        },
        {
            "image": "overlays/b <x>&#1.png",
            "source": 'defect/<script>alert("x")</script>&.png',
            "score": 1.7,
            "score_normalized": 0.9,
            "verdict": "defect",
            "n_regions": 2,
        },
        {
            "image": "overlays/c.png",
            "source": "defect/c.png",
            "score": 0.9,
            "score_normalized": 0.6,
            "verdict": "defect",
            "n_regions": 1,
        },
        {
            "image": "overlays/d.png",
            "source": "odd/d.png",
            "score": float("nan"),
            "score_normalized": float("nan"),
            "verdict": "good",
            "n_regions": 0,
        },
    ]
    path = write_index_html(tmp_path, entries)
    assert path == tmp_path / "index.html"
    page = path.read_text(encoding="utf-8")
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;.png" in page
    assert "b <x>" not in page and 'href="overlays/b%20%3Cx%3E%26%231.png"' in page
    # Score order: b (1.7), c (0.9), a (0.2), then the NaN one.
    positions = [page.index(s) for s in ("defect/&lt;script", "defect/c.png", "good/a.png", "odd/d.png")]
    assert positions == sorted(positions)
    assert re.search(r"All \(4\)", page) and re.search(r"Defects \(2\)", page) and re.search(r"Good \(2\)", page)
    assert page.count('class="card ') == 4
    # Self-contained: no external resources.
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_index_html_empty(tmp_path):
    page = write_index_html(tmp_path, []).read_text(encoding="utf-8")
    assert "No images were scored" in page and "All (0)" in page


def test_plot_roc_draws_curves(tmp_path):
    fpr = np.array([0.0, 0.0, 0.5, 1.0])
    tpr = np.array([0.0, 0.6, 0.9, 1.0])
    path = tmp_path / "roc.png"
    plot_roc(
        {"draem": (fpr, tpr, 0.9), "empty": (np.zeros(0), np.zeros(0), float("nan"))}, path, "ROC test", size=(640, 560)
    )
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert img.shape == (560, 640, 3)
    blue = np.all(np.abs(img.astype(int) - rendering._PALETTE[0]) < 30, axis=2)
    assert blue.sum() > 300  # the curve and its legend swatch


def test_banner_moves_to_bottom_when_defect_at_top():
    img = np.full((100, 120, 3), 90, np.uint8)
    m = np.zeros((100, 120), np.float32)
    m[2:10, 40:80] = 0.95
    out = render_overlay(img, m, "score 0.9  DEFECT", "defect")
    accent = np.all(out[:, 0] == np.array(rendering._DEFECT_RGB), axis=1)
    assert not accent[:50].any() and accent[-5:].all()
    # The defect at the top stays visible (tinted, not darkened by the banner).
    assert int(out[5, 60, 0]) > int(out[5, 60, 2]) + 60


def test_verdict_is_spelled_out_when_label_lacks_it():
    img = np.full((120, 200, 3), 90, np.uint8)

    def red_text_pixels(label: str, verdict: str = "defect") -> int:
        out = render_overlay(img, np.zeros((120, 200)), label, verdict).astype(int)
        band = out[: _band_height(out, verdict), 10:]
        # Light red text pixels (the verdict word), distinct from the white label text.
        return int(np.sum((band[..., 0] > 200) & (band[..., 1] < 150)))

    assert red_text_pixels("score 0.83  (raw 1.2)") > 20
    assert red_text_pixels("score 0.83  DEFECT") > 20
    assert red_text_pixels("score 0.83  (raw 1.2)", verdict="good") == 0


def test_unsupported_characters_fall_back_to_ascii():
    font = rendering._font(20)
    assert rendering._printable(font, "ROC — café ×2 ≥ 1") == "ROC - cafe x2 >= 1"
