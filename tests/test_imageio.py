"""Tests for surfaceinspect.data.imageio on generated files of every supported format and failure mode."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from surfaceinspect.data.imageio import (
    IMAGE_EXTENSIONS,
    apply_orientation,
    discover_images,
    greyscale,
    image_size,
    read_image,
    read_image_uint8,
    read_mask,
    resize_image,
)
from surfaceinspect.errors import DatasetError, ImageReadError

H, W = 24, 32


def _rgb8() -> np.ndarray:
    """A deterministic RGB image whose channels, rows and columns all differ."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 7 % 256, y * 11 % 256, (x * y) % 256], axis=2).astype(np.uint8)


def _rgb16() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 2011, y * 2711, (x + y) * 1201 + 1], axis=2).astype(np.uint16)


def _expect(t: np.ndarray, rgb: np.ndarray, scale: float, atol: float = 1e-6) -> None:
    assert isinstance(t, np.ndarray) and t.dtype == np.float32 and t.flags.c_contiguous
    assert tuple(t.shape) == (3, *rgb.shape[:2])
    ref = (rgb.astype(np.float64) / scale).transpose(2, 0, 1).astype(np.float32)
    assert np.allclose(t, ref, atol=atol, rtol=0), float(np.abs(t - ref).max())


# ---- formats and modes -------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff", ".webp"])
def test_lossless_rgb8(tmp_path: Path, ext: str) -> None:
    if ext not in IMAGE_EXTENSIONS:
        pytest.skip(f"{ext} not supported by this build")
    rgb = _rgb8()
    p = tmp_path / f"img{ext}"
    Image.fromarray(rgb).save(p, **({"lossless": True} if ext == ".webp" else {}))
    _expect(read_image(p), rgb, 255.0)
    assert np.array_equal(read_image_uint8(p), rgb)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif"])
def test_gray8_becomes_three_identical_channels(tmp_path: Path, ext: str) -> None:
    g = _rgb8()[..., 0]
    p = tmp_path / f"g{ext}"
    Image.fromarray(g).save(p)
    _expect(read_image(p), np.repeat(g[..., None], 3, axis=2), 255.0)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_rgb16_keeps_full_precision(tmp_path: Path, ext: str) -> None:
    rgb = _rgb16()
    rgb[0, 0, 2], rgb[0, 1, 2] = 1000, 1001  # differ only in the low byte
    p = tmp_path / f"c16{ext}"
    assert cv2.imwrite(str(p), rgb[..., ::-1].copy())  # OpenCV writes BGR
    t = read_image(p)
    _expect(t, rgb, 65535.0)
    # Pillow alone would reduce both to 8 bits and merge them.
    assert t[2, 0, 0] < t[2, 0, 1]
    u8 = read_image_uint8(p)
    assert u8.dtype == np.uint8 and np.abs(u8.astype(int) - np.rint(rgb / 257.0)).max() == 0


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_gray16(tmp_path: Path, ext: str) -> None:
    g = _rgb16()[..., 0]
    p = tmp_path / f"g16{ext}"
    Image.fromarray(g).save(p)
    _expect(read_image(p), np.repeat(g[..., None], 3, axis=2), 65535.0)


def test_rgba8_alpha_dropped_not_composited(tmp_path: Path) -> None:
    rgb = _rgb8()
    alpha = np.zeros((H, W), np.uint8)  # fully transparent: compositing would change every pixel
    p = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(p)
    _expect(read_image(p), rgb, 255.0)


def test_rgba16_alpha_dropped(tmp_path: Path) -> None:
    rgb = _rgb16()
    p = tmp_path / "rgba16.png"
    assert cv2.imwrite(str(p), np.dstack([rgb[..., ::-1], np.zeros((H, W), np.uint16)]))
    _expect(read_image(p), rgb, 65535.0)


def test_palette_png(tmp_path: Path) -> None:
    rgb = _rgb8()
    pal = Image.fromarray(rgb).quantize(colors=16)
    p = tmp_path / "pal.png"
    pal.save(p)
    assert Image.open(p).mode == "P"
    expected = np.asarray(pal.convert("RGB"))
    _expect(read_image(p), expected, 255.0)


def test_one_bit_png(tmp_path: Path) -> None:
    bits = (_rgb8()[..., 0] > 100).astype(np.uint8) * 255
    p = tmp_path / "bits.png"
    Image.fromarray(bits).convert("1").save(p)
    _expect(read_image(p), np.repeat(bits[..., None], 3, axis=2), 255.0)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_close_to_source(tmp_path: Path, mode: str) -> None:
    src = np.full((H, W, 3), (200, 80, 30), np.uint8)
    img = Image.fromarray(src).convert(mode)
    p = tmp_path / "a.jpeg"
    img.save(p, quality=98)
    expected = np.asarray(img.convert("RGB"))
    _expect(read_image(p), expected, 255.0, atol=4 / 255)


def _asymmetric() -> np.ndarray:
    """Each corner a different colour, so every rotation/flip is distinguishable."""
    a = np.zeros((H, W, 3), np.uint8)
    a[: H // 2, : W // 2] = (255, 0, 0)
    a[: H // 2, W // 2 :] = (0, 255, 0)
    a[H // 2 :, : W // 2] = (0, 0, 255)
    a[H // 2 :, W // 2 :] = (255, 255, 255)
    return a


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_applied(tmp_path: Path, orientation: int) -> None:
    src = Image.fromarray(_asymmetric())
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "o.jpg"
    src.save(p, exif=exif.tobytes(), quality=95)
    expected = np.asarray(
        src.transpose(
            {
                2: Image.Transpose.FLIP_LEFT_RIGHT,
                3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90,
            }[orientation]
        )
        if orientation != 1
        else src
    )
    t = read_image(p)
    assert tuple(t.shape[1:]) == expected.shape[:2] == image_size(p)
    # Compare block centres (JPEG blurs the edges between colour blocks).
    got = (t.transpose(1, 2, 0) * 255).round()
    hh, ww = expected.shape[:2]
    for y in (hh // 4, 3 * hh // 4):
        for x in (ww // 4, 3 * ww // 4):
            assert np.abs(got[y, x] - expected[y, x]).max() < 20, (orientation, y, x)


def test_jpeg_orientation_6_concrete(tmp_path: Path) -> None:
    """Orientation 6 = 'rotate 90 clockwise to display': the stored top-left corner ends top-right."""
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "six.jpg"
    Image.fromarray(_asymmetric()).save(p, exif=exif.tobytes(), quality=95)
    t = read_image(p)
    assert tuple(t.shape) == (3, W, H)
    top_right = t[:, W // 4, 3 * H // 4]
    assert top_right[0] > 0.9 and top_right[1] < 0.1 and top_right[2] < 0.1  # red


def test_tiff16_exif_orientation_applied(tmp_path: Path) -> None:
    g = _rgb16()[..., 0]
    exif = Image.Exif()
    exif[0x0112] = 8
    p = tmp_path / "o16.tif"
    Image.fromarray(g).save(p, exif=exif)
    expected = np.rot90(g, k=1)
    _expect(read_image(p), np.repeat(expected[..., None], 3, axis=2), 65535.0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pillow(orientation: int) -> None:
    """The numpy path (used for 16-bit colour) must agree with Pillow's exif_transpose."""
    src = Image.fromarray(_rgb8())
    exif = src.getexif()
    exif[0x0112] = orientation
    src.info["exif"] = exif.tobytes()
    from PIL import ImageOps

    ref = np.asarray(ImageOps.exif_transpose(src))
    assert np.array_equal(apply_orientation(_rgb8(), orientation), ref)


def test_non_ascii_path(tmp_path: Path) -> None:
    d = tmp_path / "Prüfung_検査 ß"
    d.mkdir()
    p = d / "Bild_画像.png"
    Image.fromarray(_rgb8()).save(p)
    _expect(read_image(p), _rgb8(), 255.0)
    assert discover_images(tmp_path) == [p]


# ---- failures ----------------------------------------------------------------------------------


def _reason(path: Path) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    err = info.value
    assert err.path == path and str(path) in str(err)
    assert "\n" not in str(err)
    return err.reason


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in _reason(tmp_path / "nope.png")


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir.png"
    d.mkdir()
    assert "directory" in _reason(d)


def test_zero_byte(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert "empty" in _reason(p)


def test_text_file_named_png(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    assert "not an image" in _reason(p)


def test_broken_symlink(tmp_path: Path) -> None:
    p = tmp_path / "link.png"
    p.symlink_to(tmp_path / "gone.png")
    assert "symbolic link" in _reason(p)


def _big_noise(n: int = 256) -> np.ndarray:
    # Noise so the compressed data is long and a cut lands inside the pixel data.
    return np.random.default_rng(0).integers(0, 256, (n, n, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_is_detected(tmp_path: Path, ext: str, keep: float) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the detection relies on Pillow's default
    full = tmp_path / f"full{ext}"
    Image.fromarray(_big_noise()).save(full)
    data = full.read_bytes()
    p = tmp_path / f"cut{ext}"
    p.write_bytes(data[: int(len(data) * keep)])
    reason = _reason(p)
    assert "truncated" in reason or "corrupt" in reason


def test_truncated_jpeg_header_only(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    Image.fromarray(_big_noise(64)).save(full)
    p = tmp_path / "head.jpg"
    p.write_bytes(full.read_bytes()[:200])
    _reason(p)


def test_corrupt_png_data(tmp_path: Path) -> None:
    full = tmp_path / "full.png"
    Image.fromarray(_big_noise(64)).save(full)
    data = bytearray(full.read_bytes())
    # Keep the header, overwrite the middle of the compressed data with garbage (fails its CRC/zlib).
    start = len(data) // 3
    data[start : start + 2000] = bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8))
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(data))
    assert "corrupt" in _reason(p)


def test_corrupt_jpeg_huffman_table(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    Image.fromarray(_big_noise(64)).save(full)
    data = bytearray(full.read_bytes())
    i = data.find(b"\xff\xc4")  # DHT marker: a bogus Huffman table makes libjpeg give up
    assert i > 0
    data[i + 5 : i + 25] = b"\xff" * 20
    p = tmp_path / "bad.jpg"
    p.write_bytes(bytes(data))
    assert "corrupt" in _reason(p)


def test_absurd_size_refused_before_decoding(tmp_path: Path) -> None:
    # A valid PNG header claiming 100000 x 100000 pixels (10 Gpx); never decoded.
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    p = tmp_path / "bomb.png"
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    reason = _reason(p)
    assert "megapixel" in reason or "large" in reason


def test_max_pixels_argument(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    Image.fromarray(_rgb8()).save(p)
    with pytest.raises(ImageReadError, match="megapixel"):
        read_image(p, max_pixels=100)


# ---- masks -------------------------------------------------------------------------------------


def test_read_mask(tmp_path: Path) -> None:
    m = np.zeros((H, W), np.uint8)
    m[3:7, 5:9] = 255
    m[10, 10] = 1  # any nonzero value is a defect
    p = tmp_path / "m.png"
    Image.fromarray(m).save(p)
    got = read_mask(p)
    assert got.dtype == np.bool_ and got.shape == (H, W)
    assert np.array_equal(got, m > 0)


def test_read_mask_rgb_and_empty(tmp_path: Path) -> None:
    m = np.zeros((H, W, 3), np.uint8)
    m[1, 2, 1] = 9
    p = tmp_path / "m.png"
    Image.fromarray(m).save(p)
    got = read_mask(p)
    assert got.sum() == 1 and got[1, 2]
    Image.fromarray(np.zeros((H, W), np.uint8)).save(p)
    assert not read_mask(p).any()  # an empty mask is valid


def test_read_mask_errors(tmp_path: Path) -> None:
    p = tmp_path / "m.png"
    p.write_bytes(b"junk")
    with pytest.raises(ImageReadError):
        read_mask(p)


# ---- resize ------------------------------------------------------------------------------------


def test_resize_shrink_uses_area() -> None:
    x = np.random.default_rng(0).random((3, 9, 12), dtype=np.float32)
    out = resize_image(x, (3, 4))
    # Exact 3x3 means (bilinear would sample only the centre pixel of each block).
    ref = x.reshape(3, 3, 3, 4, 3).mean(axis=(2, 4))
    assert out.shape == (3, 3, 4) and np.allclose(out, ref, atol=1e-6)


def test_resize_enlarge_uses_bilinear() -> None:
    x = np.ascontiguousarray(np.broadcast_to(np.array([[[0.0, 1.0]]], np.float32), (3, 1, 2)))
    out = resize_image(x, (1, 4))
    # Bilinear (align_corners=False) on [0, 1] -> [0, .25, .75, 1]; nearest/area would give [0, 0, 1, 1].
    assert np.allclose(out[0, 0], [0.0, 0.25, 0.75, 1.0])


def test_resize_mixed_batch_and_range() -> None:
    x = np.random.default_rng(1).random((2, 3, 10, 40), dtype=np.float32)
    out = resize_image(x, (20, 16))  # height grows, width shrinks
    assert out.shape == (2, 3, 20, 16) and out.flags.c_contiguous and out.dtype == np.float32
    assert out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6
    # Same result per image as unbatched.
    assert np.allclose(resize_image(x[1], (20, 16)), out[1])


@pytest.mark.parametrize(
    ("source", "target"),
    [((900, 900), (256, 256)), ((1024, 768), (256, 256)), ((300, 700), (256, 320)), ((100, 50), (256, 256)),
     ((257, 255), (256, 256)), ((3, 2), (16, 16)), ((600, 601), (128, 512)), ((1, 1), (4, 4))],
)  # fmt: skip
def test_resize_is_torch_interpolate_area_then_bilinear(source, target) -> None:
    """The arithmetic the export's input contract documents, and what the torch path computed before:
    without torch, an exported model must be fed the pixels the parity check fed it."""
    x = np.random.default_rng(2).random((2, 3, *source), dtype=np.float32)
    reference = torch.from_numpy(x)
    mid = (min(source[0], target[0]), min(source[1], target[1]))
    if mid != source:
        reference = torch.nn.functional.interpolate(reference, size=mid, mode="area")
    if mid != target:
        reference = torch.nn.functional.interpolate(reference, size=target, mode="bilinear", align_corners=False)
    out = resize_image(x, target)
    assert out.shape == tuple(reference.shape)
    assert np.abs(out - reference.numpy()).max() <= 1e-6


def test_resize_same_size_returns_copy() -> None:
    x = np.random.default_rng(3).random((3, 5, 5), dtype=np.float32)
    out = resize_image(x, 5)
    assert np.array_equal(out, x)
    out[:] = 0
    assert np.abs(x).sum() > 0


def test_resize_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        resize_image(np.zeros((3, 4, 4), dtype=np.uint8), 2)
    with pytest.raises(ValueError):
        resize_image(np.zeros((4, 4), np.float32), 2)
    with pytest.raises(ValueError):
        resize_image(np.zeros((3, 4, 4), np.float32), 0)


def test_greyscale_of_an_image_and_a_batch() -> None:
    grey = np.repeat(np.random.default_rng(4).random((1, 8, 8), dtype=np.float32), 3, axis=0)
    colour = grey.copy()
    colour[0] += 0.2
    assert greyscale(grey) is True and greyscale(colour) is False
    assert greyscale(np.stack([grey, colour])).tolist() == [True, False]
    assert greyscale((np.stack([grey, colour]) * 255).astype(np.uint8)).tolist() == [True, False]


# ---- discovery ---------------------------------------------------------------------------------


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_discover_recursive_sorted_case_insensitive(tmp_path: Path) -> None:
    files = [
        _touch(tmp_path / "b.PNG"),
        _touch(tmp_path / "a.jpg"),
        _touch(tmp_path / "sub" / "c.JPeG"),
        _touch(tmp_path / "sub" / "deeper" / "d.tif"),
        _touch(tmp_path / "a_1.bmp"),
        _touch(tmp_path / "Z.tiff"),
    ]
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / "model.safetensors")
    _touch(tmp_path / ".hidden.png")
    _touch(tmp_path / ".cache" / "x.png")
    _touch(tmp_path / "sub" / ".thumbs" / "y.png")
    got = discover_images(tmp_path)
    assert got == sorted(files, key=lambda p: p.relative_to(tmp_path).as_posix())
    assert [p.relative_to(tmp_path).as_posix() for p in got] == [
        "Z.tiff",
        "a.jpg",
        "a_1.bmp",
        "b.PNG",
        "sub/c.JPeG",
        "sub/deeper/d.tif",
    ]
    assert discover_images(tmp_path, recursive=False) == [
        tmp_path / "Z.tiff",
        tmp_path / "a.jpg",
        tmp_path / "a_1.bmp",
        tmp_path / "b.PNG",
    ]


def test_discover_hidden_root_is_fine(tmp_path: Path) -> None:
    p = _touch(tmp_path / ".work" / "data" / "a.png")
    assert discover_images(tmp_path / ".work" / "data") == [p]


def test_discover_file_and_missing(tmp_path: Path) -> None:
    f = _touch(tmp_path / "one.txt")
    assert discover_images(f) == [f]
    with pytest.raises(DatasetError, match="nope"):
        discover_images(tmp_path / "nope")


def test_discover_empty_folder(tmp_path: Path) -> None:
    assert discover_images(tmp_path) == []


def test_discover_symlink_loop_terminates(tmp_path: Path) -> None:
    a = _touch(tmp_path / "a" / "img.png")
    # One loop only: without a guard os.walk would still stop (ELOOP after ~40 levels) but return
    # the image ~20 times, so this fails fast instead of hanging if the guard breaks.
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    got = discover_images(tmp_path)
    assert a in got and len(got) == len(set(os.path.realpath(p) for p in got)) == 1


def test_discover_follows_symlinked_folder(tmp_path: Path) -> None:
    real = _touch(tmp_path / "elsewhere" / "x.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(real.parent, target_is_directory=True)
    assert discover_images(root) == [root / "linked" / "x.png"]
