"""Reading, resizing and finding images.

Decoding goes through Pillow, because Pillow reports truncated and corrupt files as errors
(OpenCV may silently return a half-decoded image or ``None`` without a reason) and applies EXIF
orientation for JPEG, TIFF and PNG alike. Pillow squeezes 16-bit *colour* PNG/TIFF to 8 bits, so
those (and only those) are decoded a second time with OpenCV to keep their full precision.

Choices worth knowing:

* The alpha channel is **dropped, not composited**: the stored colour under the alpha is kept.
  This is what ``PIL.Image.convert("RGB")`` (and so the usual torchvision/MVTec pipelines) does,
  and compositing would need an arbitrary background colour that differs between tools.
* Grayscale becomes three identical channels; palette images are expanded to RGB.
* 16-bit samples are scaled by 1/65535, 8-bit by 1/255; float TIFFs are clipped to [0, 1] and
  32-bit integer images are clipped to [0, 65535] and treated as 16-bit.
* Formats Pillow cannot open (e.g. 12-bit JPEG, float colour TIFF) raise :class:`ImageReadError`.
* ICC colour profiles are ignored (pixel values are used as stored).
* Truncation detection relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being False (the Pillow
  default); code that sets it to True globally would make truncated files decode silently.

Everything here is numpy, Pillow and OpenCV, never torch: scoring an exported model runs without
torch installed (the ``surfaceinspect-runtime`` install). Images are float32 arrays ``(3, H, W)``;
the torch detectors wrap them with ``torch.from_numpy`` at their own boundary.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError, features

from surfaceinspect.errors import DatasetError, ImageReadError

# WebP is decoded by Pillow (8-bit only, so OpenCV is never needed for it); checked at import so a
# Pillow build without libwebp simply does not list the suffix.
_WEBP = bool(features.check("webp"))
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} | ({".webp"} if _WEBP else set())
)

# 64 Mpx: a float32 RGB tensor of that size is already 768 MiB. Kept below Pillow's own
# decompression-bomb warning threshold (~89 Mpx) so Pillow never warns before we refuse.
MAX_PIXELS = 64 * 1024 * 1024
# Bytes read from one file at most: the largest image MAX_PIXELS admits, stored uncompressed as
# 32-bit float RGBA (64 Mpx x 16 bytes). Anything larger is not an image this tool can decode.
MAX_FILE_BYTES = MAX_PIXELS * 16

_EXIF_ORIENTATION = 0x0112

# A folder holding this file was written by surfaceinspect (heatmaps, models, reports): image
# discovery skips it, so outputs placed inside an input folder are never read back as inputs.
OUTPUT_MARKER = ".surfaceinspect-output"

# Mean absolute difference between colour channels (0..1 scale) below which an image counts as
# greyscale: exactly 0 for grey files expanded to RGB, a little above for grey re-saved as RGB JPEG.
GREY_TOLERANCE = 1.0 / 255.0


def _fail(path: Path, reason: str) -> ImageReadError:
    return ImageReadError(path, reason)


def _read_bytes(path: Path) -> bytes:
    """Read the whole file, turning every filesystem problem into a short reason.

    Only regular files are read: a named pipe (``x.png`` made by ``mkfifo``) would block the run
    forever and a device (``/dev/zero`` linked as ``zero.png``) would fill the memory. The type is
    checked before opening (opening some devices has side effects) and again on the open file
    (the name may have been swapped in between); O_NONBLOCK keeps that open from waiting for a
    pipe's writer. At most :data:`MAX_FILE_BYTES` are read.
    """
    limit = MAX_FILE_BYTES
    try:
        _require_regular(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        st = os.fstat(fd)
        _require_regular(path, st)
        if st.st_size > limit:
            raise _fail(path, f"file is {_size_text(st.st_size)}, more than the {_size_text(limit)} limit")
        data = _read_bounded(fd, st.st_size, limit)
    except OSError as exc:
        raise _fail(path, f"cannot read file ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _fail(path, f"file is larger than the {_size_text(limit)} limit")
    if not data:
        raise _fail(path, "file is empty (0 bytes)")
    return data


def _size_text(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def _read_bounded(fd: int, expected: int, limit: int) -> bytes:
    """Read ``fd`` to its end, but never more than ``limit + 1`` bytes (a file may grow while read)."""
    parts, size = [], 0
    while size <= limit:
        chunk = os.read(fd, min(limit + 1 - size, max(expected + 1 - size, 1 << 16)))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _require_regular(path: Path, st: os.stat_result) -> None:
    """Refuse anything but a regular file (the reason names what it is)."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise _fail(path, "is a directory, not an image file")
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    kind = next((name for test, name in kinds if test(mode)), "a socket" if stat.S_ISSOCK(mode) else "a special file")
    raise _fail(path, f"is {kind}, not a regular image file; only regular files are read")


def _open_error(path: Path, exc: OSError) -> ImageReadError:
    """The reason a file could not be opened (links that lead nowhere are named as such)."""
    if exc.errno == errno.ELOOP:
        return _fail(path, "symbolic link loop (the link leads back to itself)")
    if exc.errno == errno.ENOENT:
        if os.path.islink(path):
            return _fail(path, "broken symbolic link (its target does not exist)")
        return _fail(path, "file not found")
    if isinstance(exc, PermissionError):
        return _fail(path, "permission denied")
    return _fail(path, f"cannot read file ({exc.strerror or exc})")


def _open_checked(path: Path, data: bytes, max_pixels: int) -> Image.Image:
    """Open the header with Pillow and refuse unknown formats and absurd sizes before decoding."""
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _fail(path, f"not an image or unsupported format (supported: {supported_suffixes()})") from None
    except Image.DecompressionBombError:
        raise _fail(path, "image dimensions are absurdly large") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (SyntaxError, struct.error, ...)
        raise _fail(path, f"corrupt image header ({exc})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise _fail(path, f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise _fail(path, f"image is {w}x{h} pixels, more than the {max_pixels / 1e6:.0f}-megapixel limit")
    return im


def _rawmode(im: Image.Image) -> str:
    """Pillow's raw (on-disk) sample layout, e.g. ``RGB;16B``; only known before ``load()``."""
    if not im.tile:
        return im.mode
    args = im.tile[0].args
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else im.mode


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an ``(H, W[, C])`` array, as ``ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(arr, k=-1)
    if orientation == 7:
        return arr.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(arr, k=1)
    return arr


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make a good image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H,W), (H,W,1), (H,W,2) gray+alpha, (H,W,3) or (H,W,4) -> (H,W,3), same dtype."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[2]
    if c in (1, 2):
        return np.repeat(arr[:, :, :1], 3, axis=2)
    return arr[:, :, :3]


def _decode_cv2_high_depth(path: Path, data: bytes, orientation: int) -> np.ndarray:
    """Full-precision decode of 16-bit colour images, which Pillow would reduce to 8 bits."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise _fail(path, "corrupt image data (OpenCV cannot decode it)")
    if arr.ndim == 3:
        # OpenCV returns BGR(A); gray+alpha comes back as 2 channels in some builds.
        arr = arr[:, :, [2, 1, 0]] if arr.shape[2] >= 3 else arr
    return _to_rgb(apply_orientation(arr, orientation))


def _decode(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS, data: bytes | None = None) -> np.ndarray:
    """Decode to an ``(H, W, 3)`` RGB array: uint8, uint16, or float32 in [0, 1].

    ``data``: the file's bytes, already in memory (``path`` then only names it in errors).
    """
    # Pillow warns about harmless file details (palette transparency, odd EXIF blocks) while it
    # decodes correctly; such warnings would reach the operator's terminal as raw Python warnings,
    # from worker processes too. Real problems raise and become ImageReadError.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(path)
        return _decode_quietly(path, _read_bytes(path) if data is None else data, max_pixels)


def _decode_quietly(path: Path, data: bytes, max_pixels: int) -> np.ndarray:
    if not data:
        raise _fail(path, "file is empty (0 bytes)")
    im = _open_checked(path, data, max_pixels)
    rawmode = _rawmode(im)
    try:
        # load() decodes everything; with LOAD_TRUNCATED_IMAGES False it raises on truncation.
        im.load()
    except MemoryError:
        raise
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg or "incomplete" in msg:
            raise _fail(path, "truncated file (image data ends early)") from None
        raise _fail(path, f"corrupt image data ({msg})") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise ValueError, SyntaxError, zlib.error, ...
        raise _fail(path, f"corrupt image data ({exc})") from None

    orientation = _orientation(im)
    if ";16" in rawmode and im.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _decode_cv2_high_depth(path, data, orientation)

    try:
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(im)
            arr = np.clip(arr, 0, 65535).astype(np.uint16) if arr.dtype != np.uint16 else arr
        elif im.mode == "F":
            arr = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
        else:
            # convert("RGB") drops alpha, expands palettes and gray, handles CMYK/YCbCr/1-bit.
            arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any conversion failure means an unsupported pixel layout
        raise _fail(path, f"unsupported pixel format {im.mode} ({exc})") from None
    return np.ascontiguousarray(_to_rgb(apply_orientation(arr, orientation)))


def read_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as a contiguous float32 array ``(3, H, W)``, RGB in [0, 1].

    Raises :class:`ImageReadError` (with the path and a short reason) for missing, empty,
    truncated, corrupt, non-image or absurdly large files.
    """
    return to_chw_float(_decode(path, max_pixels))


def read_image_bytes(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """:func:`read_image` of an image already in memory (an HTTP request's body); ``name`` names it in errors."""
    if len(data) > MAX_FILE_BYTES:
        raise _fail(Path(name), f"image is {_size_text(len(data))}, more than the {_size_text(MAX_FILE_BYTES)} limit")
    return to_chw_float(_decode(name, max_pixels, data=data))


def to_chw_float(arr: np.ndarray) -> np.ndarray:
    """A decoded ``(H, W, 3)`` array as a contiguous float32 array ``(3, H, W)`` in [0, 1]."""
    chw = arr.transpose(2, 0, 1)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(np.divide(chw, np.float32(255.0), dtype=np.float32))
    if arr.dtype == np.uint16:
        return np.ascontiguousarray(np.divide(chw, np.float32(65535.0), dtype=np.float32))
    return np.ascontiguousarray(chw, dtype=np.float32)


def read_image_uint8(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB (16-bit rounded down to 8 bits), for overlays."""
    arr = _decode(path, max_pixels)
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.rint(arr * 255.0).astype(np.uint8)
    return np.ascontiguousarray(arr)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(H, W)`` of an image as :func:`read_image` would return it (after EXIF orientation).

    Reads only the header, so it is cheap; it does not detect truncated pixel data.
    """
    path = Path(path)
    data = _read_bytes(path)
    im = _open_checked(path, data, max_pixels=2**62)
    w, h = im.size
    return (w, h) if _orientation(im) in (5, 6, 7, 8) else (h, w)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a defect mask as a bool array ``(H, W)``: any nonzero colour channel marks a defect."""
    arr = _decode(path)
    return np.ascontiguousarray(arr.any(axis=2))


def resize_image(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a float image ``(3, H, W)`` or batch ``(B, 3, H, W)`` to ``size`` (int = square, or (h, w)).

    Each axis that shrinks uses area interpolation (the mean of the covered source pixels), which
    does not alias fine texture such as scratches into moire the way bilinear sampling would;
    each axis that grows uses bilinear interpolation, because area would just replicate pixels
    into blocks. Both keep values inside the input range. The arithmetic is torch's
    ``F.interpolate`` (``mode="area"``, then ``"bilinear"`` with ``align_corners=False``), which
    the exported graphs' input contract documents; ``tests/test_imageio.py`` holds the two together.
    """
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"resize_image expects a float array, got {img.dtype}")
    if img.ndim not in (3, 4):
        raise ValueError(f"resize_image expects (C,H,W) or (B,C,H,W), got shape {tuple(img.shape)}")
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"resize_image: size must be positive, got {size}")
    x = np.asarray(img, dtype=np.float32)
    h, w = x.shape[-2:]
    # Shrinking axes first (area), then growing axes (bilinear): handles mixed cases too.
    x = _area(x, min(h, out_h), min(w, out_w))
    x = _bilinear(_bilinear(x, -2, out_h), -1, out_w)
    # callers may modify the result in place: never hand back the input
    return x.copy() if x is img else np.ascontiguousarray(x)


def _area_bins(n: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Torch's adaptive-pooling bins: output ``i`` averages inputs ``start[i] .. end[i] - 1``."""
    i = np.arange(out)
    return (i * n) // out, -((-(i + 1) * n) // out)


def _area(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Adaptive average pooling of the last two axes to ``(out_h, out_w)`` (torch's ``mode="area"``).

    Box sums come from OpenCV's summed-area table (float64), so any ratio costs one pass over
    the input: 5 ms for a 900 x 900 RGB image on one core, where a cumulative sum in numpy takes 20.
    """
    h, w = x.shape[-2:]
    if (h, w) == (out_h, out_w):
        return x
    ys, ye = _area_bins(h, out_h)
    xs, xe = _area_bins(w, out_w)
    count = ((ye - ys)[:, None] * (xe - xs)[None, :]).astype(np.float64)
    planes = x.reshape(-1, h, w)
    out = np.empty((planes.shape[0], out_h, out_w), np.float32)
    for k, plane in enumerate(planes):
        table = cv2.integral(np.ascontiguousarray(plane), sdepth=cv2.CV_64F)
        top, bottom = table[ys], table[ye]
        out[k] = (bottom[:, xe] - top[:, xe] - bottom[:, xs] + top[:, xs]) / count
    return out.reshape(*x.shape[:-2], out_h, out_w)


def _bilinear(x: np.ndarray, axis: int, out: int) -> np.ndarray:
    """Linear interpolation along ``axis`` to ``out`` samples (torch's ``align_corners=False``)."""
    n = x.shape[axis]
    if out == n:
        return x
    # Source coordinate of each output sample's centre, clamped at 0 as torch does.
    src = np.maximum((np.arange(out, dtype=np.float64) + 0.5) * (n / out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = out
    frac = (src - lo).astype(np.float32).reshape(shape)
    below, above = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
    return (below * (np.float32(1.0) - frac) + above * frac).astype(np.float32, copy=False)


def greyscale(images: np.ndarray) -> np.ndarray | bool:
    """Which images are greyscale (three equal channels, within :data:`GREY_TOLERANCE`).

    ``images``: ``(3, H, W)`` or ``(B, 3, H, W)``, float in [0, 1] or uint8 (a numpy array, or
    anything ``np.asarray`` takes). Returns a bool for one image, a bool array ``(B,)`` for a batch.
    """
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
    diff = np.abs(x[..., 0:1, :, :] - x[..., 1:2, :, :]) + np.abs(x[..., 1:2, :, :] - x[..., 2:3, :, :])
    grey = diff.mean(axis=(-3, -2, -1), dtype=np.float64) / 2.0 <= GREY_TOLERANCE
    return bool(grey) if x.ndim == 3 else grey


def is_output_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder that surfaceinspect marked as its output (:data:`OUTPUT_MARKER`)."""
    return (Path(path) / OUTPUT_MARKER).is_file()


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def supported_suffixes() -> str:
    """The image suffixes that are read, for messages: ``.bmp, .jpeg, .jpg, .png, ...``."""
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def discover_images(
    root: str | os.PathLike[str],
    recursive: bool = True,
    skipped: list[Path] | None = None,
    others: list[Path] | None = None,
) -> list[Path]:
    """Image files under ``root`` whose suffix is in :data:`IMAGE_EXTENSIONS` (any case).

    Hidden files and folders (name starting with '.') below ``root`` are skipped, and so are
    output folders of surfaceinspect below ``root`` (:func:`is_output_dir`; appended to
    ``skipped`` when given, so the caller can say so); other files that are not images (``a.pdf``)
    are appended to ``others`` when given. Symlinked folders are followed once (loops
    cannot hang). Sorted by the POSIX relative path, so the order is the same on every machine. A
    file given as ``root`` is returned as ``[root]``. Raises :class:`DatasetError` if ``root``
    does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder; give a folder of images or an image file")
    if not root.is_dir():
        return [root]
    found: list[tuple[str, Path]] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError:
            dirnames[:] = []
            continue
        if key in seen:  # symlink loop or a folder reached twice: visit it once only
            dirnames[:] = []
            continue
        seen.add(key)
        if not recursive:
            dirnames[:] = []
        else:
            outputs = [d for d in dirnames if not _is_hidden(d) and is_output_dir(Path(dirpath) / d)]
            if skipped is not None:
                skipped.extend(Path(dirpath) / d for d in outputs)
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d) and d not in outputs)
        for name in filenames:
            if _is_hidden(name):
                continue
            p = Path(dirpath) / name
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                if others is not None:
                    others.append(p)
                continue
            found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]
