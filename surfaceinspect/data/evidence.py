"""Synthetic evidence for ranking candidate detectors without defect labels.

``train --method auto`` trains several candidates briefly and ranks them by the image AUROC of
held-out good images against anomalous versions of those images written here. SWSA (Fung et al.,
"Model Selection of Anomaly Detectors in the Absence of Labeled Validation Data", arXiv 2310.10461)
found that CutPaste-style anomalies rank detectors best on fine-grained industrial defects, so
``cutpaste`` and ``scar`` follow CutPaste; ``scratch``, ``blur`` and ``dent`` add the thin lines and
smooth, texture-free changes that real surfaces show and that pasted patches do not cover.

None of the families is DRAEM's training synthesis (Perlin-noise blobs filled with foreign texture):
judged on its own training distribution DRAEM would look better than it is. DRAEM's optional
``crack_prob`` (with ``crack_fill=dark``) and ``patch_prob`` shapes, off by default, resemble
``scratch`` and ``blur``/``dent``: a candidate trained with them has seen those families, so leave
those kinds out when such a candidate competes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from surfaceinspect.data.imageio import read_image_uint8
from surfaceinspect.errors import ImageReadError
from surfaceinspect.storage.atomic import atomic_open

ANOMALY_KINDS: tuple[str, ...] = ("cutpaste", "scar", "scratch", "blur", "dent")
AREA_FRACTIONS: tuple[float, ...] = (0.01, 0.03, 0.08)  # share of the image area an anomaly covers

# Below this no family has room to be both fully inside the image and recognisable.
MIN_SIDE = 16
# Pixel sizes (scar width, scratch thickness) are given for a 256x256 image, as in CutPaste, and
# scaled by the image's geometric-mean side so they mean the same on a 96x320 and a 2048x2048 image.
_REFERENCE_SIDE = 256.0
# Grey levels: fainter scratches and dents vanish in the sensor noise of ordinary surfaces.
_MIN_CONTRAST = 25.0
# Mild, unlike CutPaste's colour jitter: a strong brightness step would make every patch trivially visible.
_JITTER = 0.08
# Grey levels: a pasted patch must change what it covers at least this much on average. A patch of a
# plain surface from an aligned image (or from elsewhere on the same plain image) would otherwise be an
# "anomaly" nobody could see, which only adds label noise to the ranking.
_MIN_PASTE_CHANGE = 15.0
_TRIES = 20

# A family's result: float32 (H, W, 3) image, not yet rounded, and its uint8 (H, W) 0/255 mask.
_Anomaly = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class EvidenceImage:
    """One anomalous image written by :func:`write_evidence`."""

    path: Path  # the anomalous image file written
    kind: str  # one of ANOMALY_KINDS
    area: float  # the target share of the image area (one of AREA_FRACTIONS)
    source: Path  # the held-out good image it was made from


def _scale(h: int, w: int) -> float:
    return math.sqrt(h * w) / _REFERENCE_SIDE


def _is_grey(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))


def _fit_donor(donor: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The donor as float32 at the image's size, grey when the image is grey (colour would give a patch away)."""
    h, w = image.shape[:2]
    donor = np.ascontiguousarray(donor)
    if donor.shape[:2] != (h, w):
        shrink = donor.shape[0] * donor.shape[1] > h * w
        donor = cv2.resize(donor, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if _is_grey(image) and not _is_grey(donor):
        donor = np.repeat(cv2.cvtColor(donor, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    return donor.astype(np.float32)


def _far_point(
    rng: np.random.Generator, high: tuple[float, float], avoid: tuple[float, float], min_dist: tuple[float, float]
) -> tuple[float, float]:
    """A uniform point in [0, high] (y, x) not within min_dist of avoid on both axes, if one is found.

    Good images of a product are often aligned, so a patch from the same place of the donor (or of the
    image itself) would change nothing.
    """
    y = x = 0.0
    for _ in range(_TRIES):
        y, x = float(rng.uniform(0.0, high[0])), float(rng.uniform(0.0, high[1]))
        if abs(y - avoid[0]) >= min_dist[0] or abs(x - avoid[1]) >= min_dist[1]:
            break
    return y, x


def _paste(
    out: np.ndarray, patch: np.ndarray, where: tuple[slice, slice] | np.ndarray, rng: np.random.Generator
) -> None:
    """Write ``patch`` with slight brightness jitter into ``out[where]``, re-levelled if it would barely show."""
    covered = out[where]
    jittered = np.clip(patch * rng.uniform(1 - _JITTER, 1 + _JITTER), 0, 255)
    if float(np.abs(jittered - covered).mean()) < _MIN_PASTE_CHANGE:
        level, delta = float(covered.mean()), float(patch.mean() - covered.mean())
        sign = 1.0 if delta >= 0 else -1.0
        if not 5 <= level + sign * _MIN_PASTE_CHANGE <= 250:  # a plain white or black surface would clip it away
            sign = -sign
        jittered = np.clip(patch - delta + sign * _MIN_PASTE_CHANGE, 0, 255)
    out[where] = jittered


def _cutpaste(image: np.ndarray, donor: np.ndarray, area: float, rng: np.random.Generator) -> _Anomaly:
    """A rectangle of the donor's texture, aspect 0.3-3.3 (CutPaste), pasted with slight brightness jitter."""
    h, w = image.shape[:2]
    target = area * h * w
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))  # width / height
    pw = min(math.sqrt(target * aspect), w - 2.0)
    ph = min(target / pw, h - 2.0)
    pw = min(target / ph, w - 2.0)
    ph, pw = max(2, round(ph)), max(2, round(pw))
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    sy, sx = _far_point(rng, (h - ph, w - pw), (y0, x0), (ph / 2, pw / 2))
    sy, sx = round(sy), round(sx)
    out = image.astype(np.float32)
    source = _fit_donor(donor, image)
    _paste(out, source[sy : sy + ph, sx : sx + pw], (slice(y0, y0 + ph), slice(x0, x0 + pw)), rng)
    mask = np.zeros((h, w), np.uint8)
    mask[y0 : y0 + ph, x0 : x0 + pw] = 255
    return out, mask


def _half_extent(length: float, width: float, theta: float) -> tuple[float, float]:
    """(y, x) half-extent of a length x width rectangle whose long side points at angle theta."""
    c, s = abs(math.cos(theta)), abs(math.sin(theta))
    return (length * s + width * c) / 2, (length * c + width * s) / 2


def _max_length(h: int, w: int, width: float, theta: float) -> float:
    c, s = abs(math.cos(theta)), abs(math.sin(theta))
    limits = [math.inf]
    if c > 1e-6:
        limits.append((w - 2 - width * s) / c)
    if s > 1e-6:
        limits.append((h - 2 - width * c) / s)
    return max(0.0, min(limits))


def _angle_for(h: int, w: int, length: float, width: float, rng: np.random.Generator) -> float:
    """A random direction in which a length x width bar fits inside h x w, else one near the image's long side.

    Most directions leave a long bar no room on a narrow image (a line-scan strip, say).
    """
    for _ in range(8):
        theta = float(rng.uniform(0.0, math.pi))
        if _max_length(h, w, width, theta) >= length:
            return theta
    tilt = max(0.0, math.atan2(min(h, w) - 2 - width, max(h, w)))
    return (0.0 if w >= h else math.pi / 2) + float(rng.uniform(-tilt, tilt))


def _scar_shape(h: int, w: int, area: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """(length, width, angle) of a scar: 2-16 px wide (at 256x256), at least 4x as long, up to the target area."""
    target = area * h * w
    # At most a quarter of the short side, so that on a strip (e.g. 64x4096) a scar still runs lengthwise.
    width_max = max(2.0, min(16.0 * _scale(h, w), (min(h, w) - 2) / 4))
    width = min(max(2.0, rng.uniform(2.0, 16.0) * _scale(h, w)), width_max, max(2.0, math.sqrt(target / 4)))
    theta = _angle_for(h, w, target / width, width, rng)
    length = min(target / width, _max_length(h, w, width, theta))
    if length * width < target:  # cannot get longer: widen within the scar range; the area may still fall short
        width = min(width_max, max(width, target / max(length, 1.0)))
        length = min(target / width, _max_length(h, w, width, theta))
    return length, width, theta


def _rect_corners(centre: tuple[float, float], length: float, width: float, theta: float) -> np.ndarray:
    """(4, 2) x, y corners of a rotated rectangle around centre (y, x)."""
    u = np.array([math.cos(theta), math.sin(theta)]) * length / 2
    n = np.array([-math.sin(theta), math.cos(theta)]) * width / 2
    c = np.array([centre[1], centre[0]])
    return np.stack([c - u - n, c + u - n, c + u + n, c - u + n])


def _scar(image: np.ndarray, donor: np.ndarray, area: float, rng: np.random.Generator) -> _Anomaly:
    """CutPaste-scar: a long thin rectangle cut from the donor or the image itself, rotated and pasted."""
    h, w = image.shape[:2]
    length, width, theta = _scar_shape(h, w, area, rng)
    ey, ex = _half_extent(length, width, theta)
    dst = (float(rng.uniform(ey, h - 1 - ey)), float(rng.uniform(ex, w - 1 - ex)))
    # Turned by 20-90 degrees against its new place, so even a directional texture breaks at the scar.
    phi = theta + math.pi  # fits wherever theta does
    for _ in range(_TRIES):
        turned = theta + math.radians(rng.uniform(20.0, 90.0)) * rng.choice([-1.0, 1.0])
        sy, sx = _half_extent(length, width, turned)
        if sy <= (h - 1) / 2 and sx <= (w - 1) / 2:
            phi = turned
            break
    sy, sx = _half_extent(length, width, phi)
    off = _far_point(rng, (h - 1 - 2 * sy, w - 1 - 2 * sx), (dst[0] - sy, dst[1] - sx), (length / 2, length / 2))
    src_centre = np.array([off[1] + sx, off[0] + sy])
    source = _fit_donor(donor, image) if rng.random() < 0.5 else image.astype(np.float32)
    u, n = np.array([math.cos(theta), math.sin(theta)]), np.array([-math.sin(theta), math.cos(theta)])
    u2, n2 = np.array([math.cos(phi), math.sin(phi)]), np.array([-math.sin(phi), math.cos(phi)])
    rot = np.outer(u, u2) + np.outer(n, n2)  # maps the source's axes onto the scar's
    shift = np.array([dst[1], dst[0]]) - rot @ src_centre
    warped = cv2.warpAffine(
        source, np.hstack([rot, shift[:, None]]), (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    mask = np.zeros((h, w), np.uint8)
    corners = np.round(_rect_corners(dst, length, width, theta) * 16).astype(np.int32)
    cv2.fillPoly(mask, [corners], 255, lineType=cv2.LINE_8, shift=4)
    out = image.astype(np.float32)
    inside = mask > 0
    _paste(out, warped[inside], inside, rng)
    return out, mask


def _walk(
    start: np.ndarray, heading: float, length: float, shape: tuple[int, int], margin: float, rng: np.random.Generator
) -> np.ndarray:
    """(n, 2) x, y points of a gently curving line of up to ``length`` px from ``start``, ending at the border."""
    h, w = shape
    step = max(1.5, min(h, w) / 40)
    points, p, turn = [start], start, 0.0
    for noise in rng.normal(0.0, 0.02, max(1, math.ceil(length / step))):
        turn = 0.9 * turn + noise  # a damped turning rate gives the long smooth curves of a dragged particle
        heading += turn
        p = p + step * np.array([math.cos(heading), math.sin(heading)])
        if not (margin <= p[0] <= w - 1 - margin and margin <= p[1] <= h - 1 - margin):
            break
        points.append(p)
    return np.array(points)


def _scratch_alpha(h: int, w: int, area: float, thickness: int, rng: np.random.Generator) -> np.ndarray:
    """Antialiased coverage (float32 0..1) of a scratch, or of a few side by side when one cannot be long enough."""
    total = area * h * w / (thickness + 5)  # the antialiased rim and the dilated mask add ~5 px of width
    margin = thickness + 2.0
    low, high = np.array([margin, margin]), np.array([w - 1 - margin, h - 1 - margin])
    centre = low + (high - low) * rng.uniform(0.15, 0.85, 2)
    heading = _angle_for(h, w, min(total, 0.8 * max(h, w)), 2 * margin, rng)
    across = np.array([-math.sin(heading), math.cos(heading)])
    canvas = np.zeros((h, w), np.uint8)
    drawn = 0.0
    for _ in range(12):  # a scratch ends where it meets the border; more beside it make up the length
        if drawn >= 0.95 * total:
            break
        piece = min(total - drawn, 0.8 * max(h, w))
        mid = np.clip(centre + across * rng.normal(0.0, 0.08 * min(h, w)), low, high)
        tilt = heading + rng.normal(0.0, 0.1)
        ahead = _walk(mid, tilt, piece / 2, (h, w), margin, rng)
        behind = _walk(mid, tilt + math.pi, piece / 2, (h, w), margin, rng)
        points = np.concatenate([behind[::-1], ahead[1:]])
        drawn += float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())
        cv2.polylines(canvas, [np.round(points * 16).astype(np.int32)], False, 255, thickness, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _scratch(image: np.ndarray, donor: np.ndarray, area: float, rng: np.random.Generator) -> _Anomaly:
    """A thin smooth line, flat and darker or brighter than its surroundings by 2-4x their local std."""
    h, w = image.shape[:2]
    thickness = max(1, round(rng.uniform(1.0, 4.0) * _scale(h, w)))
    alpha = _scratch_alpha(h, w, area, thickness, rng)
    out = image.astype(np.float32)
    window = max(5, min(h, w) // 16) | 1
    grey = out.mean(axis=2)
    local_mean = cv2.blur(out, (window, window))
    local_std = np.sqrt(np.maximum(cv2.blur(grey * grey, (window, window)) - cv2.blur(grey, (window, window)) ** 2, 0))
    line = alpha >= 0.5 * alpha.max()
    level, spread = float(local_mean[line].mean()), float(local_std[line].mean())
    contrast = min(90.0, max(_MIN_CONTRAST, rng.uniform(2.0, 4.0) * spread))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if level + sign * contrast > 245 or level + sign * contrast < 10:  # keep the scratch from clipping
        sign = -sign
    # Replaced rather than shifted: a scratch's floor is smooth, which breaks the texture it crosses.
    groove = local_mean + sign * contrast
    out = out * (1 - alpha[..., None]) + groove * alpha[..., None]
    mask = cv2.dilate((alpha > 0).astype(np.uint8) * 255, np.ones((3, 3), np.uint8))
    return out, mask


def _ellipse_axes(h: int, w: int, area: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """(a, b, angle) semi-axes a >= b with pi*a*b = area*h*w whose rotated box fits inside h x w."""
    target = area * h * w
    for _ in range(_TRIES):
        ratio = float(rng.uniform(0.4, 1.0))
        a = math.sqrt(target / (math.pi * ratio))
        theta = float(rng.uniform(0.0, math.pi))
        ey, ex = _half_extent(2 * a, 2 * a * ratio, theta)
        if ey <= h / 2 - 1 and ex <= w / 2 - 1:
            return a, a * ratio, theta
    theta = 0.0 if w >= h else math.pi / 2  # along the long side, squeezed as far as needed
    a = min(math.sqrt(target / math.pi) * 1.6, max(h, w) / 2 - 1)
    return a, min(target / (math.pi * a), min(h, w) / 2 - 1), theta


def _soft_ellipse(
    h: int, w: int, area: float, edge: float, rng: np.random.Generator
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, float]:
    """A random ellipse: (window, weight, mask, b), weight and mask cropped to the window (ys, xs).

    The weight falls off inside the ellipse (Gaussian, sigma = edge * b) and is ~2 % at its rim, so
    the mask (the ellipse) holds nearly all the change.
    """
    a, b, theta = _ellipse_axes(h, w, area, rng)
    ey, ex = _half_extent(2 * a, 2 * b, theta)
    cy, cx = float(rng.uniform(ey, h - 1 - ey)), float(rng.uniform(ex, w - 1 - ex))
    sigma = max(0.5, edge * b)
    margin = math.ceil(sigma) + 2  # the weight is ~0.1 % one sigma outside the rim: cut there
    y0, y1 = max(0, math.floor(cy - ey) - margin), min(h, math.ceil(cy + ey) + margin + 1)
    x0, x1 = max(0, math.floor(cx - ex) - margin), min(w, math.ceil(cx + ex) + margin + 1)
    centre = (round((cx - x0) * 16), round((cy - y0) * 16))
    core = np.zeros((y1 - y0, x1 - x0), np.uint8)
    shrink = 2 * sigma + 1  # one px more for the antialiased rim of the core and the rasterised mask
    inner = (max(1, round((a - shrink) * 16)), max(1, round((b - shrink) * 16)))
    cv2.ellipse(core, centre, inner, math.degrees(theta), 0, 360, 255, -1, cv2.LINE_AA, shift=4)
    weight = cv2.GaussianBlur(core.astype(np.float32) / 255.0, (0, 0), sigma)
    mask = np.zeros_like(core)
    cv2.ellipse(mask, centre, (round(a * 16), round(b * 16)), math.degrees(theta), 0, 360, 255, -1, cv2.LINE_8, shift=4)
    return (slice(y0, y1), slice(x0, x1)), weight, mask, b


def _blur(image: np.ndarray, donor: np.ndarray, area: float, rng: np.random.Generator) -> _Anomaly:
    """An elliptical region blurred strongly (sigma 15-30 % of its minor semi-axis), blended in softly.

    Only texture shows it: on a plain or linearly shaded surface a blur changes (almost) nothing.
    """
    h, w = image.shape[:2]
    (ys, xs), weight, mask_crop, b = _soft_ellipse(h, w, area, 0.12, rng)
    sigma = max(1.5, rng.uniform(0.15, 0.3) * b)
    pad = math.ceil(3 * sigma)  # blur with real neighbours, not a mirrored crop edge
    y0, y1, x0, x1 = max(0, ys.start - pad), min(h, ys.stop + pad), max(0, xs.start - pad), min(w, xs.stop + pad)
    out = image.astype(np.float32)
    blurred = cv2.GaussianBlur(out[y0:y1, x0:x1], (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    blurred = blurred[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    wgt = weight[..., None]
    out[ys, xs] = out[ys, xs] * (1 - wgt) + blurred * wgt
    mask = np.zeros((h, w), np.uint8)
    mask[ys, xs] = mask_crop
    return out, mask


def _dent(image: np.ndarray, donor: np.ndarray, area: float, rng: np.random.Generator) -> _Anomaly:
    """A smooth elliptical brightness change (x0.6-0.8 or x1.2-1.4, >= 25 grey levels): dent, stain, unevenness."""
    h, w = image.shape[:2]
    (ys, xs), weight, mask_crop, _ = _soft_ellipse(h, w, area, float(rng.uniform(0.08, 0.18)), rng)
    out = image.astype(np.float32)
    region = out[ys, xs]
    level = float(region.mean(axis=2)[mask_crop > 0].mean())
    brighter_max = min(1.4, 240.0 / max(level, 1.0))  # brighter only while the region stays below white
    brighter = brighter_max >= 1.2 and (rng.random() < 0.5 or level < 40)  # darkening a dark surface is invisible
    factor = float(rng.uniform(1.2, brighter_max) if brighter else rng.uniform(0.6, 0.8))
    sign = 1.0 if brighter else -1.0
    floor = sign * max(0.0, _MIN_CONTRAST - abs(factor - 1) * level)
    out[ys, xs] = region + (region * (factor - 1) + floor) * weight[..., None]
    mask = np.zeros((h, w), np.uint8)
    mask[ys, xs] = mask_crop
    return out, mask


_FAMILIES = {"cutpaste": _cutpaste, "scar": _scar, "scratch": _scratch, "blur": _blur, "dent": _dent}


def _check_rgb8(name: str, array: np.ndarray) -> None:
    if not (isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3):
        raise ValueError(
            f"{name} must be a uint8 (H, W, 3) array, got {getattr(array, 'dtype', type(array))} "
            f"{getattr(array, 'shape', '')}"
        )


def synthesize_anomaly(
    image: np.ndarray, donor: np.ndarray, kind: str, area: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """An anomalous copy of ``image`` and its mask: (uint8 (H, W, 3), uint8 (H, W) 0/255).

    ``image`` and ``donor`` are uint8 (H, W, 3) RGB; the donor (resized to the image when its size
    differs) supplies foreign texture to ``cutpaste`` and ``scar``. ``area`` is the target share of
    the image the anomaly covers, placed at random fully inside the image. A greyscale image (three
    equal channels) stays greyscale. The inputs are never modified.
    """
    _check_rgb8("image", image)
    _check_rgb8("donor", donor)
    if kind not in _FAMILIES:
        raise ValueError(f"unknown anomaly kind {kind!r}; use one of {', '.join(ANOMALY_KINDS)}")
    if not 0.0 < area <= 0.5:
        raise ValueError(f"anomaly area {area} must be a share of the image in (0, 0.5]")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image is {image.shape[0]}x{image.shape[1]}; anomalies need {MIN_SIDE} px on each side")
    out, mask = _FAMILIES[kind](image, donor, area, rng)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if _is_grey(image):  # float rounding must not leave a tint on a grey image
        out = np.repeat(out[..., :1], 3, axis=2)
    return np.ascontiguousarray(out), mask


def _readable(paths: Sequence[Path], warn: Callable[[str], None]) -> Iterator[tuple[Path, np.ndarray]]:
    for path in map(Path, paths):
        try:
            image = read_image_uint8(path)
        except ImageReadError as exc:
            warn(f"skipped unreadable image {path}: {exc.reason}")
            continue
        if min(image.shape[:2]) < MIN_SIDE:
            warn(
                f"skipped {path}: {image.shape[0]}x{image.shape[1]} is too small for synthetic anomalies "
                f"(needs {MIN_SIDE} px on each side)"
            )
            continue
        yield path, image


def _plan(t: int, kinds: Sequence[str], areas: Sequence[float]) -> tuple[str, float]:
    """Kind and area of the t-th anomaly of the set.

    Both cycle as fast as they can (kind t mod K, area t mod A), so any run of anomalies holds every
    kind and every area about equally often; the shift per lcm(K, A) anomalies walks through the
    combinations that t mod K, t mod A alone would miss when K and A share a factor, so each block
    of K*A anomalies holds every (kind, area) pair once.
    """
    k, a = len(kinds), len(areas)
    return kinds[t % k], areas[(t + t // math.lcm(k, a)) % a]


def _write_png(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path} as PNG")
    with atomic_open(path, "wb") as handle:
        handle.write(data.tobytes())


def write_evidence(
    good_paths: Sequence[Path],
    out_dir: Path,
    *,
    seed: int,
    per_image: int = 3,
    kinds: Sequence[str] = ANOMALY_KINDS,
    areas: Sequence[float] = AREA_FRACTIONS,
    reporter_warn: Callable[[str], None] | None = None,
) -> list[EvidenceImage]:
    """Write ``per_image`` anomalous versions of each readable good image as PNG under ``out_dir``.

    Files are ``out_dir/<kind>/<nnnn>_<stem>.png`` (nnnn counts the anomalies of the set). Unreadable
    or too small images are skipped and named through ``reporter_warn``. Kinds and areas cycle so
    that each occurs about equally often over the set; the donor of foreign texture is the previous
    readable image (the next one for the first; a mirrored copy when there is only one), so at most
    three images are in memory at once. Same inputs and seed give byte-identical files and an equal list.
    Files already in ``out_dir`` are left alone: the returned list is what this call wrote.
    """
    if per_image < 1:
        raise ValueError(f"per_image={per_image}: write at least one anomaly per image")
    if not kinds or any(kind not in _FAMILIES for kind in kinds):
        raise ValueError(f"kinds {list(kinds)}: give one or more of {', '.join(ANOMALY_KINDS)}")
    if not areas or any(not 0.0 < area <= 0.5 for area in areas):
        raise ValueError(f"areas {list(areas)}: give one or more shares of the image in (0, 0.5]")
    warn = reporter_warn or (lambda _message: None)
    images = _readable(good_paths, warn)
    written: list[EvidenceImage] = []
    current, following = next(images, None), None
    if current is not None:
        following = next(images, None)
    donor = following[1] if following is not None else None
    index = 0
    while current is not None:
        path, image = current
        if donor is None:
            donor = np.ascontiguousarray(image[:, ::-1])
        for variant in range(per_image):
            t = index * per_image + variant
            kind, area = _plan(t, kinds, areas)
            # Seeded per anomaly, so one anomaly does not depend on how many random draws another took.
            rng = np.random.default_rng([seed & (2**64 - 1), t])
            anomalous, _ = synthesize_anomaly(image, donor, kind, area, rng)
            target = Path(out_dir) / kind / f"{t:04d}_{path.stem}.png"
            _write_png(target, anomalous)
            written.append(EvidenceImage(path=target, kind=kind, area=float(area), source=path))
        donor, current, index = image, following, index + 1
        following = next(images, None) if current is not None else None
    return written
