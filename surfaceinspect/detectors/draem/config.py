"""DRAEM hyperparameters (defaults = the paper's setting; profiles override them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from surfaceinspect.config import CommonConfig, MethodConfig
from surfaceinspect.data.imageio import IMAGE_EXTENSIONS, discover_images
from surfaceinspect.errors import ConfigError

# Names accepted by ``anomaly_source`` besides a folder path. Which one "builtin" means was decided
# by measurement (BENCHMARKS.md, section 3); the others stay selectable.
BUILTIN_SOURCES = ("builtin", "fractal", "structured", "self")
DEFAULT_BUILTIN = "self"


@dataclass
class DraemConfig(MethodConfig):
    """DRAEM (Zavrtanik et al., ICCV 2021). Defaults follow the paper (256 px, 700 epochs)."""

    method: ClassVar[str] = "draem"
    inference_keys: ClassVar[frozenset[str]] = frozenset({"smoothing_kernel", "inference_bf16", "fuse_bn"})
    cli_options: ClassVar[dict[str, str]] = {
        "anomaly_source": "folder of texture images (e.g. DTD), or builtin (= self: transformed crops of the "
        "good images), fractal, structured",
    }
    profile_notes: ClassVar[dict[str, str]] = {
        "cpu": "machines without CUDA (the default there): whole objects, training within 30 min on 2 cores",
        "paper": "a CUDA GPU (the default there): DRAEM as published, 256 px, 700 epochs",
        "texture": "textured surfaces with small defects (fabric, sheet metal, wood) on a CPU: 128-px tiles",
        "long": "users who can wait (CPU): an ensemble of 3 cpu models, 3x the time, a little more accurate",
    }
    epochs: int = 700
    lr: float = 1e-4
    steps: int = 0  # >0: train exactly this many optimiser steps instead of ``epochs`` passes
    # Learning-rate drops as fractions of the schedule: paper x0.1 at epochs 400 and 600 of 700.
    lr_milestones: tuple[float, ...] = (400 / 700, 600 / 700)
    lr_gamma: float = 0.1
    # Networks: paper widths 128 (reconstructive) / 64 (discriminative); levels = conv blocks,
    # each level after the first halves the resolution (paper: 5 and 6 levels).
    recon_width: int = 128
    disc_width: int = 64
    recon_levels: int = 5
    disc_levels: int = 6
    # Loss: L2 + (1 - SSIM) + focal.
    ssim_window: int = 11
    focal_gamma: float = 2.0
    focal_weight: float = 1.0
    # Train on random crop x crop windows of the full-size training images (0 = whole images);
    # scoring still runs on the whole image (both networks are fully convolutional). A crop keeps the
    # image's pixel detail at a fraction of the cost: 128 of 256 px costs a quarter per sample.
    train_crop: int = 0
    # Early stopping on a held-out synthetic validation set (0 = off): every val_every steps, the
    # pixel AP of anomaly segmentation on val_images good images held out from training (each
    # clean and with 3 fixed synthetic anomalies); stop after val_patience evaluations without a
    # new best and keep the best weights. Guards long schedules against overfitting the synthesis.
    val_every: int = 0
    val_images: int = 16
    val_patience: int = 4
    # Anomaly synthesis.
    anomaly_prob: float = 0.5  # share of training samples that get a synthetic anomaly
    opacity_range: tuple[float, float] = (0.1, 1.0)  # beta: weight of the texture inside the mask
    perlin_scale_range: tuple[int, int] = (0, 5)  # noise periods 2^a x 2^b over the image, a,b in range
    perlin_threshold: float = 0.5
    augment_ops: int = 3  # random ops applied to each anomaly-source texture
    anomaly_source: str = "builtin"  # builtin | fractal | structured | self | path/to/folder/of/images
    # Anomaly shapes beyond the paper's Perlin blobs, for plain grey surfaces (0 = the paper's synthesis):
    # share of anomalies whose mask is a thin crack-like curve (filled as crack_fill says),
    # and share that are a soft-edged region blurred and 10-35 % darker or brighter (uneven surface, no new texture).
    crack_prob: float = 0.0
    crack_fill: str = "texture"  # texture (from the anomaly source) | dark (a darkened groove, as open cracks look)
    patch_prob: float = 0.0
    # The authors' code turns 30 % of the good images by an angle in (-90, 90) before synthesis
    # (not in the paper's text; 0 = off).
    rotate_prob: float = 0.0
    # When every training image is grey (R = G = B), make the pasted textures grey too, so that colour
    # alone never gives a synthetic anomaly away (the paper's DTD textures are colour photos).
    match_grayscale: bool = True
    # Training memory: recompute each block's activations in the backward pass instead of keeping
    # them (same results; ~1/3 more compute). For the paper widths on machines with little RAM.
    activation_checkpointing: bool = False
    # Training arithmetic: auto = bf16 autocast on a CUDA GPU that supports it (fp32 master weights,
    # losses in fp32), fp32 elsewhere: bf16 on a CPU without AMX/AVX-512-BF16 is a slow emulation.
    train_precision: str = "auto"  # auto | fp32 | bf16
    # Ensemble: train this many DRAEM models one after another (model i with seed common.seed + i,
    # each on the whole schedule and an equal share of common.time_budget_min) and score with the
    # mean of their anomaly probabilities. Costs `members` times the training and scoring time; it
    # averages out the large seed-to-seed spread of short schedules (BENCHMARKS.md, section 9).
    members: int = 1
    # Scoring.
    smoothing_kernel: int = 21  # mean filter on the anomaly map before taking its maximum
    # Inference speed path (CPU): BatchNorm folded into convs, channels_last, optional bf16 autocast.
    inference_bf16: bool = False
    fuse_bn: bool = True

    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (one halving per network level)."""
        return 2 ** (max(self.recon_levels, self.disc_levels) - 1)

    def validate(self, common: CommonConfig) -> None:
        super().validate(common)
        p = self.method
        if self.steps < 0:
            raise ConfigError(f"{p}.steps={self.steps}: use 0 (train for {p}.epochs) or a positive number of steps")
        for name in ("recon_width", "disc_width"):
            if getattr(self, name) < 4:
                raise ConfigError(f"{p}.{name}={getattr(self, name)}: use at least 4 (paper: 128 / 64)")
        for name in ("recon_levels", "disc_levels"):
            if not 2 <= getattr(self, name) <= 8:
                raise ConfigError(f"{p}.{name}={getattr(self, name)}: use 2..8 (paper: 5 / 6)")
        if any(not 0.0 < f < 1.0 for f in self.lr_milestones) or list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ConfigError(f"{p}.lr_milestones={list(self.lr_milestones)}: use increasing fractions in (0, 1)")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ConfigError(f"{p}.lr_gamma={self.lr_gamma}: use a value in (0, 1], e.g. 0.1")
        if self.ssim_window < 3 or self.ssim_window % 2 == 0:
            raise ConfigError(f"{p}.ssim_window={self.ssim_window}: use an odd number >= 3 (paper: 11)")
        if self.smoothing_kernel < 1 or self.smoothing_kernel % 2 == 0:
            raise ConfigError(f"{p}.smoothing_kernel={self.smoothing_kernel}: use an odd number >= 1 (paper: 21)")
        if self.focal_gamma < 0 or self.focal_weight < 0:
            raise ConfigError(f"{p}.focal_gamma and {p}.focal_weight must be >= 0")
        if not 0.0 <= self.anomaly_prob <= 1.0:
            raise ConfigError(f"{p}.anomaly_prob={self.anomaly_prob}: use a value in [0, 1] (paper: 0.5)")
        if self.val_every < 0 or self.val_images < 1 or self.val_patience < 1:
            raise ConfigError(
                f"{p}.val_every={self.val_every}, {p}.val_images={self.val_images}, {p}.val_patience="
                f"{self.val_patience}: use val_every >= 0 (0 = no early stop), val_images >= 1, val_patience >= 1"
            )
        for name in ("crack_prob", "patch_prob", "rotate_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{p}.{name}={getattr(self, name)}: use a share in [0, 1] (0 = off)")
        if self.crack_fill not in ("texture", "dark"):
            raise ConfigError(f"{p}.crack_fill={self.crack_fill!r}: use texture or dark")
        if self.crack_prob + self.patch_prob > 1.0:
            raise ConfigError(
                f"{p}.crack_prob + {p}.patch_prob = {self.crack_prob + self.patch_prob:g}: the two shares of "
                "anomalies must add up to at most 1 (the rest are the paper's Perlin blobs)"
            )
        lo, hi = self.opacity_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"{p}.opacity_range={[lo, hi]}: use [low, high] with 0 <= low <= high <= 1")
        a, b = self.perlin_scale_range
        if not 0 <= a <= b <= 8:
            raise ConfigError(f"{p}.perlin_scale_range={[a, b]}: use [low, high] with 0 <= low <= high <= 8")
        if not -1.0 < self.perlin_threshold < 1.0:
            raise ConfigError(f"{p}.perlin_threshold={self.perlin_threshold}: use a value in (-1, 1) (paper: 0.5)")
        if not 0 <= self.augment_ops <= 10:
            raise ConfigError(f"{p}.augment_ops={self.augment_ops}: use 0..10 (paper: 3)")
        m = self.size_multiple()
        if self.train_crop < 0 or self.train_crop % m:
            raise ConfigError(f"{p}.train_crop={self.train_crop}: use 0 (whole images) or a positive multiple of {m}")
        if not 1 <= self.members <= 16:
            raise ConfigError(f"{p}.members={self.members}: use 1 (one model) to 16 (an ensemble of 16 models)")
        if self.train_precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"{p}.train_precision={self.train_precision!r}: use auto, fp32 or bf16")
        self._validate_source()

    def size_reason(self) -> str:
        return f"DRAEM halves the image {self.size_multiple().bit_length() - 1} times"

    def _validate_source(self) -> None:
        src = self.anomaly_source
        if src in BUILTIN_SOURCES:
            return
        path = Path(src).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"{self.method}.anomaly_source={src!r} is neither a folder nor one of {', '.join(BUILTIN_SOURCES)}; "
                "point it at a folder of texture images (e.g. your DTD copy) or use builtin"
            )
        if not discover_images(path):
            raise ConfigError(
                f"{self.method}.anomaly_source={src!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add texture images or use builtin"
            )
