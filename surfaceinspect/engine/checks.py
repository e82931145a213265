"""Reliability checks of scored images against the training images (colour, aspect)."""

from __future__ import annotations

from typing import Any

from surfaceinspect.config import RunConfig
from surfaceinspect.data.streaming import LoadedImage
from surfaceinspect.engine.geometry import ASPECT_RANGE_MARGIN, ASPECT_TOLERANCE
from surfaceinspect.engine.inputs import MAX_LISTED_FAILURES
from surfaceinspect.ui import Reporter


class ImageCheck:
    """Finds the images unlike the training images in one respect: a note in each one's record, one warning for all."""

    def __init__(self) -> None:
        self.count = 0
        self.names: list[str] = []

    def differs(self, item: LoadedImage) -> bool:
        raise NotImplementedError

    def note(self, item: LoadedImage) -> str:
        """The record's warning for one such image (short: it is repeated in every record)."""
        raise NotImplementedError

    def message(self, names: str) -> str:
        raise NotImplementedError

    def see(self, item: LoadedImage, name: str) -> str | None:
        """Count the image if it differs; returns its record's warning (None if it does not)."""
        if item.image is None or not self.differs(item):
            return None
        self.count += 1
        if len(self.names) < MAX_LISTED_FAILURES:
            self.names.append(name)
        return self.note(item)

    def report(self, reporter: Reporter) -> None:
        if self.count:
            more = f" and {self.count - len(self.names)} more" if self.count > len(self.names) else ""
            reporter.warn(self.message(", ".join(self.names) + more))


class ColourCheck(ImageCheck):
    """Images whose colour mode differs from the training images' (grey vs colour).

    A model trained on colour images sees a greyscale image as far from everything it learned
    (and the reverse), so its score says little.
    """

    def __init__(self, trained_on: str | None) -> None:
        super().__init__()
        self.trained_on = trained_on if trained_on in ("grey", "colour") else None

    def differs(self, item: LoadedImage) -> bool:
        return self.trained_on is not None and item.grey != (self.trained_on == "grey")

    def note(self, item: LoadedImage) -> str:
        other = "colour" if self.trained_on == "grey" else "greyscale"
        return f"{other} image, model trained on {self.trained_on} images: score not reliable"

    def message(self, names: str) -> str:
        other = "colour" if self.trained_on == "grey" else "greyscale"
        return (
            f"{self.count} image(s) are {other} but the model was trained on {self.trained_on} images "
            f"({names}); their scores are not reliable: use the camera setting "
            "of the training images, or train a model on such images"
        )


class AspectCheck(ImageCheck):
    """Images whose aspect ratio lies outside the training images' (squashed differently, so scored unreliably).

    Training images vary (MTD's span 0.36-2.6), and the model has seen every aspect in that range,
    so the check is against the range (stored at training), widened by :data:`ASPECT_RANGE_MARGIN`;
    a model of an older version stored only the median, checked with :data:`ASPECT_TOLERANCE`.
    Tiled models see every image at its own scale, so the aspect does not matter to them.
    """

    def __init__(self, training: dict[str, Any], tiled: bool) -> None:
        super().__init__()
        self.allowed: tuple[float, float] | None = None
        self.trained = ""
        span, median = training.get("image_aspect_range"), training.get("image_aspect")
        if tiled:
            return
        if isinstance(span, list) and len(span) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in span):
            low, high = float(min(span)), float(max(span))
            self.allowed = (low / ASPECT_RANGE_MARGIN, high * ASPECT_RANGE_MARGIN)
            self.trained = f"{low:.3g}-{high:.3g}"
        elif isinstance(median, (int, float)) and median > 0:
            self.allowed = (median / ASPECT_TOLERANCE, median * ASPECT_TOLERANCE)
            self.trained = f"{median:.3g}"

    def differs(self, item: LoadedImage) -> bool:
        height, width = item.original_size
        if self.allowed is None or not height or not width:
            return False
        return not self.allowed[0] <= width / height <= self.allowed[1]

    def note(self, item: LoadedImage) -> str:
        height, width = item.original_size
        return (
            f"aspect {width / height:.3g} (width/height) outside the training images' {self.trained}: "
            "distorted unlike them, score not reliable"
        )

    def message(self, names: str) -> str:
        return (
            f"{self.count} image(s) have an aspect ratio (width/height) far outside the training images' "
            f"{self.trained} ({names}); resized to the model's input they are distorted unlike the "
            "training images, so their scores are not reliable (each record says so in its warnings): crop "
            "them like the training images, or train with --image-size keep:L or tiling (common.tiling.enabled)"
        )


def reliability_checks(metadata: dict[str, Any], run_config: RunConfig) -> list[ImageCheck]:
    """The checks of scored images against the model's training images (colour mode, aspect)."""
    training = metadata.get("training", {})
    return [
        ColourCheck(training.get("image_colour")),
        AspectCheck(training, run_config.common.tiling.enabled),
    ]
