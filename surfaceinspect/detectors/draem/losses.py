"""DRAEM losses: L2 + (1 - SSIM) on the reconstruction, focal loss on the segmentation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian window (size, size)."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    g = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Mean SSIM of (B, C, H, W) images with a Gaussian window, over the valid region.

    Wang et al. 2004 constants (K1 0.01, K2 0.03). The authors' code zero-pads the borders, which
    makes a dark frame look like structure; we average over the positions where the window fits,
    which equals skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5)``.
    """
    c = a.shape[1]
    w = gaussian_window(window, sigma).to(a)[None, None].expand(c, 1, window, window)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a * mu_a
    var_b = filt(b * b) - mu_b * mu_b
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return s.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss  -(1 - p_t)^gamma log p_t  of 2-class logits (B, 2, H, W) vs a {0,1} mask (B, 1, H, W)."""
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target.long())
    p_t = logp_t.exp()
    return (-((1.0 - p_t) ** gamma) * logp_t).mean()


class DraemLoss(nn.Module):
    """L = L2(rec, image) + (1 - SSIM(rec, image)) + w * Focal(logits, mask)."""

    def __init__(self, ssim_window: int = 11, focal_gamma: float = 2.0, focal_weight: float = 1.0) -> None:
        super().__init__()
        self.ssim_window = ssim_window
        self.focal_gamma = focal_gamma
        self.focal_weight = focal_weight

    def forward(
        self, rec: torch.Tensor, image: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        l2 = F.mse_loss(rec, image)
        ssim_loss = 1.0 - ssim(rec, image, self.ssim_window)
        focal = focal_loss(logits, mask, self.focal_gamma)
        total = l2 + ssim_loss + self.focal_weight * focal
        parts = {"l2": float(l2.detach()), "ssim": float(ssim_loss.detach()), "focal": float(focal.detach())}
        if not math.isfinite(parts["l2"] + parts["ssim"] + parts["focal"]):
            parts["nonfinite"] = 1.0
        return total, parts
