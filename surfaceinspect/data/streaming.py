"""Streaming image loading for training and scoring (reader threads, bad files isolated).

A file that cannot be read never aborts a run: the loader yields an item carrying the error
instead of the image, and the engine reports it and moves on.

Images are read by threads, not processes: decoding (Pillow, OpenCV) and resizing (OpenCV,
numpy) release the GIL, threads start at once and hand over arrays without copying them between
processes, and nothing here needs torch, so a scoring install without torch reads images the same way.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from surfaceinspect.data.imageio import greyscale, read_image, resize_image
from surfaceinspect.errors import ImageReadError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")

# An image is refused when the network would have to enlarge it more than this along an axis (a
# 1x1 or 8x8 "image" upscaled to 256 px gives the detector nothing to look at; its score means nothing).
MAX_UPSCALE = 8
MIN_IMAGE_SIDE = 8  # pixels, whatever the network input size


def min_image_size(size: tuple[int, int]) -> tuple[int, int]:
    """The smallest image ``(H, W)`` accepted for a network input of ``size`` = ``(H, W)`` pixels."""
    return max(MIN_IMAGE_SIDE, math.ceil(size[0] / MAX_UPSCALE)), max(MIN_IMAGE_SIDE, math.ceil(size[1] / MAX_UPSCALE))


@dataclass
class LoadedImage:
    """One file as the loader delivers it: the network input, or the reason it failed."""

    index: int
    path: Path
    image: np.ndarray | None  # (3, H, W) float32 in [0, 1], resized to the network input (unless not asked to)
    original_size: tuple[int, int]  # (H, W) of the file; (0, 0) on error
    original: np.ndarray | None = None  # uint8 HxWx3 RGB, only when asked for (heatmaps)
    error: str | None = None
    grey: bool = False  # three equal channels (a greyscale file, or colour without colour)


def decode_or_reason(read: Callable[[], np.ndarray]) -> tuple[np.ndarray | None, str | None]:
    """``(read(), None)``, or ``(None, why)`` when it fails: one bad file is a reason, never a crashed run."""
    try:
        return read(), None
    except ImageReadError as exc:
        return None, exc.reason
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one bad file, not a crashed run
        return None, f"{type(exc).__name__}: {exc}"


def load_item(
    index: int,
    path: Path,
    read: Callable[[], np.ndarray],
    size: tuple[int, int],
    keep_original: bool = False,
    resize: bool = True,
) -> LoadedImage:
    """One image as the loader delivers it: ``read()`` decodes it (a file, or bytes in memory), then the
    size check and the resize to the network input ``size``, or with ``resize=False`` (tiled scoring)
    kept at its own resolution; either way an image far smaller than ``size`` is refused."""
    image, reason = decode_or_reason(read)
    if image is None:
        return LoadedImage(index, path, None, (0, 0), error=reason)
    height, width = int(image.shape[1]), int(image.shape[2])
    min_h, min_w = min_image_size(size)
    if height < min_h or width < min_w:
        reason = (
            f"image is {width}x{height} pixels, too small to inspect: this model needs at least "
            f"{min_w}x{min_h} (its input is {size[1]}x{size[0]})"
        )
        return LoadedImage(index, path, None, (0, 0), error=reason)
    original = None
    if keep_original:
        original = (image.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
    resized = resize_image(image, size) if resize else image  # a new array either way: clipped in place
    np.clip(resized, 0.0, 1.0, out=resized)
    return LoadedImage(index, path, resized, (height, width), original, grey=bool(greyscale(resized)))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """``map(fn, items)`` computed by ``workers`` threads (0: in this thread), results in input order.

    At most ``ahead`` results are computed before the consumer takes them, so a slow consumer
    (a network scoring batch after batch) never makes the readers hold the whole folder in memory.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    pending: collections.deque[Future[R]] = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="surfaceinspect-read") as pool:
        try:
            for item in items:
                if len(pending) >= max(1, ahead):
                    yield pending.popleft().result()
                pending.append(pool.submit(fn, item))
            while pending:
                yield pending.popleft().result()
        finally:  # the consumer stopped early (or failed): drop what is queued, wait for what runs
            for future in pending:
                future.cancel()


def iterate_images(
    paths: Sequence[Path],
    size: tuple[int, int],
    batch_size: int,
    workers: int,
    keep_original: bool = False,
    resize: bool = True,
) -> Iterator[list[LoadedImage]]:
    """Yield lists of LoadedImage in file order, ``batch_size`` at a time, read by ``workers`` threads.

    The readers run up to two batches per worker ahead of the consumer, as a DataLoader's prefetch would.
    """
    paths = list(paths)
    batch_size = max(1, batch_size)
    # No more workers than images: a thread with nothing to read only costs its start.
    workers = min(workers, len(paths))

    def load(index: int) -> LoadedImage:
        return load_item(index, paths[index], lambda: read_image(paths[index]), size, keep_original, resize)

    items = ordered_map(load, range(len(paths)), workers, ahead=batch_size * 2 * max(1, workers))
    batch: list[LoadedImage] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def stack_images(items: list[LoadedImage]) -> np.ndarray:
    """Stack the readable items of a batch into ``(B, 3, H, W)`` float32."""
    return np.stack([item.image for item in items if item.image is not None])


def load_training_images(
    paths: Sequence[Path], size: tuple[int, int], workers: int, batch_size: int = 16
) -> tuple[torch.Tensor, list[Path], list[tuple[Path, str]]]:
    """Read all training images as one uint8 tensor ``(N, 3, H, W)``; returns (images, ok paths, failures)."""
    import torch  # training only: scoring never comes here

    chunks: list[np.ndarray] = []
    ok: list[Path] = []
    failures: list[tuple[Path, str]] = []
    for batch in iterate_images(paths, size, batch_size, workers):
        for item in batch:
            if item.image is None:
                failures.append((item.path, item.error or "unreadable"))
            else:
                chunks.append((item.image * 255.0 + 0.5).astype(np.uint8))
                ok.append(item.path)
    images = np.stack(chunks) if chunks else np.empty((0, 3, *size), dtype=np.uint8)
    return torch.from_numpy(images), ok, failures
