"""Rendering: heat-map overlays, the results ``index.html`` and ROC plots.

Maps passed here are already *normalised* by the caller (calibration): 0.5 is the decision
threshold, so colours mean the same thing on every image. Nothing in this module rescales a map
per image (min-max normalisation would paint every good image as if it had a defect).
Text is drawn with Pillow's built-in scalable font, so no font files or downloads are needed.
"""

from __future__ import annotations

import functools
import html
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from surfaceinspect.storage.atomic import write_bytes_atomic, write_text_atomic

__all__ = ["colorize", "plot_roc", "render_overlay", "save_png", "write_index_html"]

THRESHOLD = 0.5
DEFAULT_OPACITY = 0.4  # heat opacity at the threshold (heatmap --opacity)
_DEFECT_RGB = (229, 57, 53)
_GOOD_RGB = (46, 160, 67)
# Positions on the TURBO colour map: the calm half (below threshold) stays in blues, the hot half
# starts at yellow. The jump at 0.5 is deliberate: it makes the decision boundary visible.
_CALM_RANGE = (0.08, 0.33)
_HOT_RANGE = (0.62, 0.92)  # stop before TURBO's dark maroon end, which vanishes on dark parts
_LUT_SIZE = 1024


@functools.lru_cache(maxsize=1)
def _lut() -> np.ndarray:
    """(_LUT_SIZE, 3) float32 RGB colours for normalised values 0..1."""
    turbo = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(-1, 1), cv2.COLORMAP_TURBO)
    turbo = turbo.reshape(256, 3)[:, ::-1].astype(np.float32)  # BGR -> RGB
    v = np.linspace(0.0, 1.0, _LUT_SIZE)
    below = v < THRESHOLD
    pos = np.where(
        below,
        _CALM_RANGE[0] + (_CALM_RANGE[1] - _CALM_RANGE[0]) * v / THRESHOLD,
        _HOT_RANGE[0] + (_HOT_RANGE[1] - _HOT_RANGE[0]) * (v - THRESHOLD) / (1.0 - THRESHOLD),
    )
    grid = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(pos, grid, turbo[:, c]) for c in range(3)], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _lut_u8() -> np.ndarray:
    return np.rint(_lut()).astype(np.uint8)


def _clean_map(norm_map: np.ndarray) -> np.ndarray:
    m = np.asarray(norm_map, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"norm_map must be HxW, got shape {m.shape}")
    return np.clip(np.nan_to_num(m, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def colorize(norm_map: np.ndarray) -> np.ndarray:
    """Colour a normalised map (0.5 = threshold) as uint8 HxWx3 RGB: blues below 0.5, yellow-to-red above."""
    m = _clean_map(norm_map)
    idx = (m * (_LUT_SIZE - 1) + 0.5).astype(np.int32)
    return _lut_u8()[idx]


def _opacity(m: np.ndarray, alpha: float) -> np.ndarray:
    """Per-pixel overlay opacity: invisible for clearly good pixels, faint just below the threshold,
    ``alpha`` at the threshold rising to ``1.4 * alpha`` (at most 0.9) at map value 1. It never
    reaches 1, so the surface (and the defect itself) stays visible under the heat."""
    calm = 0.3 * alpha * np.clip((m - 0.25) / (THRESHOLD - 0.25), 0.0, 1.0) ** 2
    hot = np.minimum(0.9, alpha * (1.0 + 0.4 * (m - THRESHOLD) / (1.0 - THRESHOLD)))
    return np.where(m < THRESHOLD, calm, hot)


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


_ASCII_FALLBACK = {"—": "-", "–": "-", "−": "-", "×": "x", "≥": ">=", "≤": "<=", "→": "->", "µ": "u"}


@functools.lru_cache(maxsize=1024)
def _has_glyph(font: Any, char: str) -> bool:
    # Pillow's built-in font covers basic Latin only; a missing glyph renders as the same box as
    # a private-use code point.
    def signature(c: str) -> tuple:
        mask = font.getmask(c)
        return mask.size, bytes(mask)

    return char.isspace() or signature(char) != signature("\U0010fff0")


def _printable(font: Any, text: str) -> str:
    """Replace characters the font cannot draw (dashes, accents, math signs) by ASCII look-alikes."""
    out = []
    for char in text:
        if _has_glyph(font, char):
            out.append(char)
            continue
        plain = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
        if plain and plain != char and all(_has_glyph(font, c) for c in plain):
            out.append(plain)
        else:
            out.append(_ASCII_FALLBACK.get(char, "?"))
    return "".join(out)


def _text_width(font: Any, text: str) -> float:
    return float(font.getlength(text)) if hasattr(font, "getlength") else float(font.getbbox(text)[2])


def _wrap(font: Any, text: str, width: float) -> list[str]:
    """Greedy wrap that breaks at runs of 2+ spaces first (keeps "score 0.83" together),
    and inside a chunk at single spaces only when the chunk alone is too wide."""
    chunks = [c for c in re.split(r" {2,}", text.strip()) if c]
    lines: list[str] = []
    line = ""
    for chunk in chunks:
        candidate = f"{line}  {chunk}" if line else chunk
        if _text_width(font, candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for word in chunk.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _text_width(font, candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
    if line:
        lines.append(line)
    return lines or [""]


def _as_rgb(image_rgb: np.ndarray) -> np.ndarray:
    img = np.asarray(image_rgb)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"image must be HxWx3 RGB (or HxW gray), got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {img.dtype}")
    return np.ascontiguousarray(img[:, :, :3])


def render_overlay(
    image_rgb: np.ndarray,
    norm_map: np.ndarray,
    label: str,
    verdict: str,
    alpha: float = DEFAULT_OPACITY,
    outline: np.ndarray | None = None,
) -> np.ndarray:
    """Blend the coloured map over the image, outline regions and draw a text banner.

    ``outline`` (bool, HxW of the image) is what is outlined: the engine passes exactly the
    regions its record counts (none for a good verdict), so picture and record agree; None
    outlines the map's pixels >= 0.5.

    Returns uint8 HxWx3 RGB at the image's own resolution (a map of another size is resized
    to it bilinearly). ``alpha`` is the overlay opacity at the threshold (0.5); it rises to
    ``1.4 * alpha`` (at most 0.9) towards map value 1, so the defect stays visible under the heat,
    while below the threshold it stays under ``0.3 * alpha`` and pixels below 0.25 are not tinted
    at all. ``verdict`` ('good' or 'defect') picks the banner accent
    colour; tokens of ``label`` equal to the verdict are drawn in that colour too (and the verdict
    is put in front of the label when the label does not contain it). The banner
    sits at the top unless that would hide more above-threshold pixels than the bottom.
    """
    if verdict not in ("good", "defect"):
        raise ValueError(f"verdict must be 'good' or 'defect', got {verdict!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _as_rgb(image_rgb)
    h, w = img.shape[:2]
    m = _clean_map(norm_map)
    if m.shape != (h, w):
        m = np.clip(cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)

    # out = img + (colour - img) * opacity, in place on one float32 buffer (large images).
    base = img.astype(np.float32)
    blend = colorize(m).astype(np.float32)
    blend -= base
    blend *= _opacity(m, alpha)[:, :, None]
    blend += base
    blend += 0.5  # round; the result stays within [0, 255] as a convex combination
    out = blend.astype(np.uint8)

    if verdict not in label.lower().split():
        label = f"{verdict.upper()}  {label}"  # the verdict is always spelled out, not only colour-coded
    hot = m >= THRESHOLD
    binary = (hot if outline is None else np.asarray(outline, dtype=bool)).astype(np.uint8)
    if binary.shape != (h, w):
        raise ValueError(f"outline must be {h}x{w} like the image, got shape {binary.shape}")
    layout = _banner_layout(h, w, label)
    band_h = layout["band_h"]
    # The banner goes at the top unless that hides more above-threshold pixels than the bottom.
    top = 0 if int(hot[:band_h].sum()) <= int(hot[h - band_h :].sum()) else h - band_h
    rows = slice(top, top + band_h)
    # Translucent dark band so the image stays faintly visible under the text.
    band = out[rows].astype(np.float32)
    out[rows] = np.rint(band * 0.25 + np.array((18, 20, 24), np.float32) * 0.75).astype(np.uint8)

    # Region outlines, drawn after the band so they stay visible under it: a white ring with a dark
    # halo just *outside* each region (reads on bright and dark parts alike, and never covers the
    # region itself, which matters for tiny defects).
    if binary.any():
        line = max(1, round(min(h, w) / 300))
        inner = _dilate(binary, line)
        outer = _dilate(binary, 2 * line)
        out[(outer > 0) & (inner == 0)] = (15, 15, 15)
        out[(inner > 0) & (binary == 0)] = (255, 255, 255)

    accent = _DEFECT_RGB if verdict == "defect" else _GOOD_RGB
    out[rows, : layout["bar"]] = accent
    return _draw_label(out, layout, top, verdict)


def _dilate(binary: np.ndarray, radius: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(binary, kernel)


def _banner_layout(h: int, w: int, label: str) -> dict[str, Any]:
    """Font and band geometry for an image of h x w pixels."""
    # Font size follows the image size (readable from 100 px to several thousand px). A label that
    # does not fit on one line may shrink the font a little (never below 9 px), then wraps.
    base = int(np.clip(round(0.045 * min(h, w) + 0.012 * max(h, w)), 10, 80))
    for size in range(base, max(9, round(0.8 * base)) - 1, -1):
        pad, bar = max(2, size // 4), max(3, size // 4)
        font = _font(size)
        text = _printable(font, label)
        if _text_width(font, text) <= w - bar - 2 * pad:
            lines = [text]
            break
    else:
        size = base
        pad, bar = max(2, size // 4), max(3, size // 4)
        font = _font(size)
        lines = _wrap(font, _printable(font, label), w - bar - 2 * pad)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (size, size // 4)
    line_h = ascent + descent
    band_h = min(h, len(lines) * line_h + 2 * pad)
    return {"font": font, "lines": lines, "pad": pad, "bar": bar, "line_h": line_h, "band_h": band_h}


def _draw_label(img: np.ndarray, layout: dict[str, Any], top: int, verdict: str) -> np.ndarray:
    # Lighter tints of the accent for text on the dark band (contrast ratio > 4.5).
    text_accent = (255, 110, 100) if verdict == "defect" else (110, 220, 120)
    font = layout["font"]
    space = _text_width(font, " ")
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    y = top + layout["pad"]
    for text in layout["lines"]:
        x = layout["bar"] + layout["pad"]
        for i, token in enumerate(text.split(" ")):
            x += space if i else 0.0
            color = text_accent if token.lower() == verdict else (245, 245, 245)
            draw.text((x, y), token, font=font, fill=color)
            x += _text_width(font, token)
        y += layout["line_h"]
    return np.asarray(pil).copy()


def encode_png(image_rgb: np.ndarray) -> bytes:
    """An RGB uint8 image as the bytes of a PNG file."""
    img = _as_rgb(image_rgb)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode a {img.shape[1]}x{img.shape[0]} image as PNG")
    return buf.tobytes()


def save_png(path: str | Path, image_rgb: np.ndarray, *, below: str | Path | None = None) -> None:
    """Write an RGB uint8 image as PNG atomically (``below``: see :func:`surfaceinspect.storage.atomic.atomic_open`)."""
    write_bytes_atomic(path, encode_png(image_rgb), below=below)


# ------------------------------------------------------------------------------------------ index.html

_CSS = """
:root { --bg:#f4f5f7; --card:#fff; --ink:#1d2330; --muted:#667085; --line:#e3e6eb;
        --defect:#e53935; --good:#2ea043; --error:#b58900; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       background:var(--bg); color:var(--ink); }
header { position:sticky; top:0; z-index:1; background:#1d2330; color:#fff; padding:14px 24px;
         display:flex; flex-wrap:wrap; gap:16px; align-items:center; }
header h1 { font-size:18px; margin:0 12px 0 0; font-weight:600; }
.stat { font-size:13px; color:#c9ced8; } .stat b { color:#fff; font-size:16px; }
.filters { margin-left:auto; display:flex; gap:6px; }
.filters button { border:1px solid #4a5264; background:transparent; color:#fff; padding:6px 12px;
                  border-radius:6px; cursor:pointer; font:inherit; }
.filters button.active { background:#fff; color:#1d2330; }
main { display:grid; grid-template-columns:repeat(auto-fill, minmax(240px, 1fr)); gap:16px; padding:20px 24px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; overflow:hidden;
        display:flex; flex-direction:column; }
.card.defect { border-top:4px solid var(--defect); } .card.good { border-top:4px solid var(--good); }
.card.error { border-top:4px solid var(--error); }
.thumb { display:block; background:#111; aspect-ratio:1/1; max-height:70vh; }
.thumb img { width:100%; height:100%; object-fit:contain; display:block; }
.card.wide { grid-column:1 / -1; }  /* line-scan strips get the whole row instead of a sliver */
.warn { color:#9a6700; font-size:12px; }
.src a { color:inherit; }
.meta { padding:8px 10px 10px; display:grid; gap:3px; }
.row { display:flex; justify-content:space-between; align-items:center; gap:8px; }
.badge { font-size:11px; font-weight:700; letter-spacing:.04em; color:#fff; padding:2px 8px; border-radius:10px; }
.badge.defect { background:var(--defect); } .badge.good { background:var(--good); }
.badge.error { background:var(--error); }
.thumb.missing { display:flex; align-items:center; justify-content:center; color:#9aa3b2; }
.why { color:var(--muted); font-size:12px; font-style:italic; }
.facts { margin:0; padding:10px 24px; display:flex; flex-wrap:wrap; gap:4px 24px; background:#eceef2;
         border-bottom:1px solid var(--line); font-size:12px; }
.facts div { display:flex; gap:6px; } .facts dt { color:var(--muted); } .facts dd { margin:0; overflow-wrap:anywhere; }
.note { margin:12px 24px 0; padding:10px 14px; background:#fff4e5; border:1px solid #f0b429; border-radius:6px; }
.score { font-variant-numeric:tabular-nums; font-weight:600; }
.src { color:var(--muted); font-size:12px; overflow-wrap:anywhere; }
.small { color:var(--muted); font-size:12px; }
.empty { padding:40px; color:var(--muted); }
"""

_JS = """
(function () {
  var buttons = document.querySelectorAll('.filters button');
  function apply(kind) {
    document.querySelectorAll('.card').forEach(function (card) {
      card.style.display = (kind === 'all' || card.dataset.verdict === kind) ? '' : 'none';
    });
    buttons.forEach(function (b) { b.classList.toggle('active', b.dataset.filter === kind); });
  }
  buttons.forEach(function (b) { b.addEventListener('click', function () { apply(b.dataset.filter); }); });
})();
"""


def _url(path: Any) -> str:
    """A relative path (or a file:/// URI) as an escaped URL attribute value (spaces, '#', '?', '<' ... are safe)."""
    posix = str(path).replace("\\", "/")
    if posix.startswith("file:///"):  # already a URI (an original on another drive); no relative path looks so
        return html.escape(posix, quote=True)
    return html.escape(quote(posix, safe="/"), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    return "n/a" if math.isnan(f) else f"{f:.{digits}g}"


_VERDICT_ORDER = {"defect": 0, "error": 1, "good": 2}  # what needs the operator's attention first

NO_REGION_REASON = (
    "no region: the image score is above the image threshold, but no pixel is above the pixel "
    "threshold (the anomaly is spread thinly rather than in one spot)"
)


def _sort_key(entry: Mapping[str, Any]) -> tuple[int, bool, float]:
    score = float(entry["score"]) if entry.get("score") is not None else math.nan
    order = _VERDICT_ORDER.get(str(entry["verdict"]), 2)
    return (order, math.isnan(score), -score if not math.isnan(score) else 0.0)


WIDE_ASPECT = 2.5  # width / height from which a card spans the whole row


def _source_html(e: Mapping[str, Any]) -> str:
    """The image's path as given, linked to the original file when the entry knows where it is."""
    src = html.escape(str(e["source"]).replace("\\", "/"), quote=True)
    if e.get("original"):
        src = f'<a href="{_url(e["original"])}" target="_blank" rel="noopener" title="the original image">{src}</a>'
    return f'<div class="src">{src}</div>'


def _warnings_html(e: Mapping[str, Any]) -> str:
    return "".join(f'<div class="warn">warning: {html.escape(str(w))}</div>' for w in e.get("warnings") or ())


def _card(e: Mapping[str, Any]) -> str:
    """One image's card: verdict, score, threshold, regions, warnings, the overlay and a link to the original."""
    if e["verdict"] == "error":
        reason = html.escape(str(e.get("error") or "unreadable"))
        return (
            '<article class="card error" data-verdict="error">'
            '<div class="thumb missing"><span>not scored</span></div>'
            '<div class="meta"><div class="row"><span class="badge error">UNREADABLE</span></div>'
            f'<div class="why">{reason}</div>{_source_html(e)}</div></article>'
        )
    verdict = "defect" if e["verdict"] == "defect" else "good"
    img = _url(e["image"])
    alt = html.escape(str(e["source"]), quote=True)
    n_regions = int(e["n_regions"])
    why = f'<div class="why">{html.escape(NO_REGION_REASON)}</div>' if verdict == "defect" and not n_regions else ""
    width, height = int(e.get("width") or 0), int(e.get("height") or 0)
    shape = f' style="aspect-ratio:{width} / {height}"' if width and height else ""
    wide = " wide" if width and height and width / height >= WIDE_ASPECT else ""
    threshold = f"threshold {_fmt(e['threshold'], 5)} · " if e.get("threshold") is not None else ""
    return (
        f'<article class="card {verdict}{wide}" data-verdict="{verdict}">'
        f'<a class="thumb" href="{img}" target="_blank" rel="noopener"{shape}>'
        f'<img src="{img}" alt="{alt}" loading="lazy"></a>'
        f'<div class="meta"><div class="row"><span class="badge {verdict}">{verdict.upper()}</span>'
        f'<span class="score" title="raw anomaly score: defect if score &gt;= threshold">score {_fmt(e["score"], 5)}'
        f'</span></div><div class="row small"><span>{threshold}{n_regions} region{"" if n_regions == 1 else "s"}'
        f"</span></div>{why}{_warnings_html(e)}{_source_html(e)}</div></article>"
    )


def write_index_html(
    out_dir: Path,
    entries: Sequence[Mapping[str, Any]],
    title: str = "surfaceinspect results",
    context: Mapping[str, Any] | None = None,
    note: str | None = None,
) -> Path:
    """Write ``out_dir/index.html`` (atomically): one card per image, defects first, highest score first.

    Each entry needs the keys ``source`` (original image path as given to the user) and
    ``verdict`` ('good', 'defect' or 'error'); scored entries also ``image`` (overlay PNG path
    relative to ``out_dir``), ``score`` (the raw score, as in the records and the CLI) and
    ``n_regions``; 'error' entries ``error`` (why the file could not be scored; they get a card
    with the reason, no image). Optional: ``threshold``, ``warnings``, ``width``/``height`` (the
    thumbnail keeps that aspect; strips span the row) and ``original`` (link to the source image,
    relative to ``out_dir``). A defect card without a region says why. ``context`` (label ->
    value, e.g. the model, its thresholds and the source folder) is shown under the title;
    ``note`` (e.g. that the run was interrupted) stands out above the cards. The page is
    self-contained (inline CSS/JS, no network), every path and text is HTML-escaped, thumbnails
    link to the full-size overlay.
    """
    out_dir = Path(out_dir)
    ordered = sorted(entries, key=_sort_key)
    n_defect = sum(1 for e in ordered if e["verdict"] == "defect")
    n_error = sum(1 for e in ordered if e["verdict"] == "error")
    n_good = len(ordered) - n_defect - n_error
    body = "\n".join(_card(e) for e in ordered) if ordered else '<p class="empty">No images were scored.</p>'
    t = html.escape(title)
    facts = "".join(
        f"<div><dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd></div>" for k, v in (context or {}).items()
    )
    facts_html = f'<dl class="facts">{facts}</dl>' if facts else ""
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    unreadable, unreadable_button = "", ""
    if n_error:
        unreadable = f'<span class="stat"><b style="color:#ffd54f">{n_error}</b> unreadable</span>'
        unreadable_button = f'<button type="button" data-filter="error">Unreadable ({n_error})</button>'
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{t}</h1>
<span class="stat"><b>{len(ordered)}</b> images</span>
<span class="stat"><b style="color:#ff8a80">{n_defect}</b> defect</span>
<span class="stat"><b style="color:#7ee787">{n_good}</b> good</span>
{unreadable}
<nav class="filters">
<button type="button" data-filter="all" class="active">All ({len(ordered)})</button>
<button type="button" data-filter="defect">Defects ({n_defect})</button>
<button type="button" data-filter="good">Good ({n_good})</button>
{unreadable_button}
</nav>
</header>
{facts_html}
{note_html}
<main>
{body}
</main>
<script>{_JS}</script>
</body>
</html>
"""
    path = out_dir / "index.html"
    write_text_atomic(path, page)
    return path


# -------------------------------------------------------------------------------------------- ROC plot

_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | Path,
    title: str = "ROC",
    size: tuple[int, int] = (900, 780),
) -> None:
    """Draw ROC curves ``{name: (fpr, tpr, auc)}`` into a PNG at ``path`` (atomic write).

    Curves with fewer than two points (e.g. one-class test sets) are listed in the legend as n/a.
    """
    width, height = size
    left, right, top, bottom = 96, 32, 64, 84
    pw, ph = width - left - right, height - top - bottom
    img = np.full((height, width, 3), 255, np.uint8)

    def to_px(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        px = left + np.asarray(x, np.float64) * pw
        py = top + (1.0 - np.asarray(y, np.float64)) * ph
        return np.stack([px, py], axis=1)

    shift = 4  # sub-pixel precision for anti-aliased lines
    for k in range(6):
        g = k / 5
        (gx, gy) = to_px([g], [g])[0]
        cv2.line(img, (int(gx), top), (int(gx), top + ph), (232, 232, 232), 1)
        cv2.line(img, (left, int(gy)), (left + pw, int(gy)), (232, 232, 232), 1)
    # Chance diagonal, dashed.
    for s in np.arange(0.0, 1.0, 0.02):
        a, b = to_px([s, min(1.0, s + 0.01)], [s, min(1.0, s + 0.01)])
        cv2.line(img, tuple(map(int, a)), tuple(map(int, b)), (160, 160, 160), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (left + pw, top + ph), (60, 60, 60), 1)

    legend = []
    for i, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        color = _PALETTE[i % len(_PALETTE)]
        fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
        ok = fpr.size >= 2 and fpr.size == tpr.size and np.all(np.isfinite(fpr)) and np.all(np.isfinite(tpr))
        if ok:
            pts = np.rint(to_px(fpr, tpr) * (1 << shift)).astype(np.int32)
            cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, color, 3, cv2.LINE_AA, shift)
        shown = f"{float(auc):.3f}" if ok and math.isfinite(float(auc)) else "n/a"
        text = f"{_printable(_font(18), str(name))}  AUROC {shown}"
        legend.append((text, color if ok else (200, 200, 200)))

    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    dark = (30, 30, 30)
    f_title, f_label, f_tick = _font(24), _font(18), _font(15)
    draw.text((width / 2, top / 2), _printable(f_title, title), font=f_title, fill=dark, anchor="mm")
    for k in range(6):
        g = k / 5
        gx, gy = to_px([g], [g])[0]
        draw.text((gx, top + ph + 8), f"{g:.1f}", font=f_tick, fill=dark, anchor="mt")
        draw.text((left - 8, gy), f"{g:.1f}", font=f_tick, fill=dark, anchor="rm")
    draw.text((left + pw / 2, height - 24), "False positive rate", font=f_label, fill=dark, anchor="mm")
    ylabel = Image.new("RGB", (260, 30), (255, 255, 255))
    ImageDraw.Draw(ylabel).text((130, 15), "True positive rate", font=f_label, fill=dark, anchor="mm")
    ylabel = ylabel.rotate(90, expand=True)
    pil.paste(ylabel, (18, top + ph // 2 - ylabel.height // 2))

    if legend:
        line_h = 26
        box_w = int(max(_text_width(f_label, t) for t, _ in legend)) + 64
        box_h = line_h * len(legend) + 16
        x0, y0 = left + pw - box_w - 12, top + ph - box_h - 12
        draw.rectangle((x0, y0, x0 + box_w, y0 + box_h), fill=(255, 255, 255), outline=(190, 190, 190))
        for j, (text, color) in enumerate(legend):
            cy = y0 + 8 + j * line_h + line_h // 2
            draw.line((x0 + 12, cy, x0 + 40, cy), fill=color, width=4)
            draw.text((x0 + 50, cy), text, font=f_label, fill=dark, anchor="lm")

    out = np.asarray(pil)
    save_png(path, out)
