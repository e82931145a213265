"""What CS-Flow's backbones are, without building them: channels and strides per stage, input statistics.

Torch-free, so that a run's configuration (and so an exported CS-Flow model) can be read and
checked where torch is not installed; :mod:`.backbones` builds the networks.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about one backbone (used to validate sizes before building anything)."""

    name: str
    stage_channels: tuple[int, ...]  # output channels of stages 1..7
    stage_strides: tuple[int, ...]  # cumulative stride after stages 1..7
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def channels(self, stage: int) -> int:
        return self.stage_channels[stage - 1]

    def stride(self, stage: int) -> int:
        return self.stage_strides[stage - 1]


# EfficientNet-B0 stage layout: (repeats, kernel, stride, expand ratio, out channels); every variant
# scales it with a width and a depth multiplier.
_B0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_STRIDES = (2, 4, 8, 16, 16, 32, 32)
# (width multiplier, depth multiplier) of the Lite variants (tensorflow/tpu efficientnet_lite_builder).
_LITE_MULTIPLIERS = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channel rounding of the reference implementation (multiple of 8, never below 90%)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def _lite_stage_channels(width: float) -> tuple[int, ...]:
    return tuple(_round_filters(c, width) for *_, c in _B0_STAGES)


# Lite's TF "SAME" padding gives ceil(size / stride), torchvision's symmetric padding gives the same
# for the sizes we accept (multiples of the stride), so both backbones share the size rules.
BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_b5": BackboneSpec(
        "efficientnet_b5", (24, 40, 64, 128, 176, 304, 512), _STRIDES, IMAGENET_MEAN, IMAGENET_STD
    ),
    **{
        name: BackboneSpec(name, _lite_stage_channels(w), _STRIDES, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        for name, (w, _d) in _LITE_MULTIPLIERS.items()
    },
}
# Why (0.5, 0.5, 0.5): the Lite models were trained in TensorFlow on inputs scaled to [-1, 1]
# ((x - 127.5) / 128); feeding them ImageNet mean/std statistics shifts every BatchNorm input.


def available_backbones() -> list[str]:
    return sorted(BACKBONES)
