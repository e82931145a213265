"""CS-Flow hyperparameters (defaults follow the paper, except the backbone, which must work offline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from surfaceinspect.config import CommonConfig, MethodConfig
from surfaceinspect.errors import ConfigError

from .backbone_specs import BACKBONES, available_backbones

MAP_MODES = ("largest", "product")
SCORE_MODES = ("mean", "max", "topk")
FEATURE_CACHES = ("memory", "disk", "none")
FEATURE_NORMS = ("none", "channel", "whiten")
DOWNSCALE_MODES = ("bilinear", "bicubic", "area", "nearest")


@dataclass
class CSFlowConfig(MethodConfig):
    """CS-Flow settings. ``epochs``/``lr`` come from MethodConfig; everything else is here."""

    method: ClassVar[str] = "csflow"
    inference_keys: ClassVar[frozenset[str]] = frozenset(
        {"map_mode", "map_sigma", "score_mode", "score_topk", "channels_last"}
    )
    cli_options: ClassVar[dict[str, str]] = {
        "backbone_weights": "local file with the backbone's ImageNet weights (offline installs of B5)",
    }
    profile_notes: ClassVar[dict[str, str]] = {
        "cpu": "machines without CUDA (the default there): EfficientNet-Lite0 features, offline, within 30 min",
        "paper": "a CUDA GPU (the default there): CS-Flow as published, EfficientNet-B5 features",
        "texture": "fine textures and small defects on a CPU: larger backbone at 512 px, score from the map peak",
    }

    epochs: int = 240  # paper: 4 meta-epochs x 60
    lr: float = 2e-4
    # Feature extractor
    backbone: str = "efficientnet_lite0"  # efficientnet_b5 (paper) | efficientnet_lite0/1/2 (offline)
    backbone_weights: str = ""  # weights file; "" = torch hub cache (B5) or the installed package (Lite)
    feature_stage: int = 6  # EfficientNet stage whose output is used (paper: 6 -> 304 ch, stride 32 on B5)
    n_scales: int = 3  # image scales 1, 1/2, 1/4
    downscale_mode: str = "bilinear"  # how the image is shrunk for the smaller scales
    # none (paper) | channel: standardise each channel of each scale with training-set mean/std. A fixed
    # affine map (constant log-det), so the model class is unchanged, but the identity flow at the start
    # already sees unit-variance inputs and far fewer epochs are needed (what a CPU budget allows).
    # whiten: subtract the training mean and multiply by the inverse square root of the training
    # covariance of each scale (ZCA): a fixed invertible 1x1 convolution, again a constant log-det. The
    # identity flow at the start is then a full-covariance Gaussian of the features (useful with few
    # or no epochs); on DAGM the flow did not improve on that Gaussian in 20 epochs, while with
    # channel it passed it after 45 (BENCHMARKS.md, section 7), so no profile uses it.
    feature_norm: str = "none"
    whiten_shrinkage: float = 0.01  # covariance + shrinkage * mean variance * I before the inverse root
    # Flow
    n_blocks: int = 4
    hidden_channels: int = 1024
    kernel_sizes: tuple[int, ...] = (3, 3, 3, 5)  # one per block
    clamp: float = 3.0  # soft clamp of the log-scales
    leaky_slope: float = 0.1
    # Optimiser (Adam)
    eps: float = 1e-4
    weight_decay: float = 1e-5
    # tuple[float, ...] (length checked in validate): config.py's fixed-length tuple coercion swaps type and value.
    betas: tuple[float, float] = (0.9, 0.999)  # the authors' code uses Adam's defaults; anomalib (0.5, 0.9)
    grad_clip: float = 1.0  # max gradient norm
    # Scoring
    map_mode: str = "largest"  # largest: largest scale (paper) | product: geometric mean over scales
    map_sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in pixels of image_size (0 = off)
    # Image score. mean (paper): mean of z^2/2 over every position, channel and scale; it dilutes a defect
    # that covers a few percent of the image. max: the largest value of the (smoothed) anomaly map.
    # topk: the mean of the largest score_topk fraction of the map's pixels.
    score_mode: str = "mean"
    score_topk: float = 0.05  # fraction of the map's pixels that score_mode=topk averages
    # Runtime
    feature_cache: str = "memory"  # memory | disk | none (recompute features every epoch)
    cache_dir: str = ""  # where feature_cache=disk writes (default: the system temp folder)
    channels_last: bool = True  # memory layout for convolutions on the CPU

    def size_multiple(self) -> int:
        """Image sizes must be a multiple of this so that every scale gives exact half-size maps."""
        spec = BACKBONES[self.backbone]
        return spec.stride(self.feature_stage) * 2 ** (self.n_scales - 1)

    def size_reason(self) -> str:
        return f"csflow with {self.backbone} stage {self.feature_stage} at {self.n_scales} scales"

    def validate(self, common: CommonConfig) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(
                f"csflow.backbone={self.backbone!r} is unknown; choose one of: {', '.join(available_backbones())}"
            )
        if not 1 <= self.feature_stage <= 7:
            raise ConfigError(f"csflow.feature_stage={self.feature_stage}: use a stage between 1 and 7 (paper: 6)")
        if not 1 <= self.n_scales <= 5:
            raise ConfigError(f"csflow.n_scales={self.n_scales}: use 1 to 5 (paper: 3)")
        if self.n_blocks < 1:
            raise ConfigError(f"csflow.n_blocks={self.n_blocks}: use at least 1 (paper: 4)")
        if len(self.kernel_sizes) != self.n_blocks:
            raise ConfigError(
                f"csflow.kernel_sizes has {len(self.kernel_sizes)} entries but n_blocks={self.n_blocks}; "
                f"give one odd kernel size per block, e.g. {[3] * (self.n_blocks - 1) + [5]}"
            )
        if any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ConfigError(f"csflow.kernel_sizes={list(self.kernel_sizes)}: use odd sizes such as 3 or 5")
        if self.hidden_channels < 1:
            raise ConfigError(f"csflow.hidden_channels={self.hidden_channels}: use at least 1 (paper: 1024)")
        if self.clamp < 0:
            raise ConfigError(f"csflow.clamp={self.clamp}: use a value >= 0 (paper: 3; 0 disables clamping)")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ConfigError("csflow.eps and csflow.grad_clip must be > 0 and csflow.weight_decay >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"csflow.betas={list(self.betas)}: use two values in [0, 1), e.g. [0.9, 0.999]")
        if self.map_mode not in MAP_MODES:
            raise ConfigError(f"csflow.map_mode={self.map_mode!r}: use one of: {', '.join(MAP_MODES)}")
        if self.map_sigma < 0:
            raise ConfigError(f"csflow.map_sigma={self.map_sigma}: use a value >= 0")
        if self.score_mode not in SCORE_MODES:
            raise ConfigError(f"csflow.score_mode={self.score_mode!r}: use one of: {', '.join(SCORE_MODES)}")
        if not 0.0 < self.score_topk <= 1.0:
            raise ConfigError(
                f"csflow.score_topk={self.score_topk}: use a fraction of the map's pixels in (0, 1], e.g. 0.05"
            )
        if self.feature_cache not in FEATURE_CACHES:
            raise ConfigError(f"csflow.feature_cache={self.feature_cache!r}: use one of: {', '.join(FEATURE_CACHES)}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ConfigError(f"csflow.feature_norm={self.feature_norm!r}: use one of: {', '.join(FEATURE_NORMS)}")
        if not self.whiten_shrinkage > 0:
            raise ConfigError(
                f"csflow.whiten_shrinkage={self.whiten_shrinkage}: use a small positive fraction, e.g. 0.01"
            )
        if self.downscale_mode not in DOWNSCALE_MODES:
            raise ConfigError(
                f"csflow.downscale_mode={self.downscale_mode!r}: use one of: {', '.join(DOWNSCALE_MODES)}"
            )
        super().validate(common)  # epochs, lr and the input size (needs a valid backbone and stage)

    def check_resources(self) -> None:
        """Raise BackboneWeightsError (one line) now if the backbone's pretrained weights are absent."""
        from .backbones import resolve_weights  # torch: only training comes here

        resolve_weights(self.backbone, self.backbone_weights or None)
