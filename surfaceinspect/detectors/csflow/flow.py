"""The cross-scale normalizing flow of CS-Flow (Rudolph et al., WACV 2022).

One fully convolutional flow acts jointly on the feature maps of ``n_scales`` scales (each half the
size of the previous). Each block permutes the channels of every scale with a fixed random
permutation, then applies two affine half-couplings whose scale/shift subnetworks
(:class:`CrossConvolutions`) see the conditioning half of *all* scales. The log-determinant is
exact: permutations contribute 0, each coupling the sum of its (soft-clamped) log-scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """Soft clamping of log-scales, ``clamp * 0.636 * atan(s / clamp)``: bounded by ~±clamp, slope 0.636 at 0."""
    if clamp <= 0:
        return s
    return clamp * 0.636 * torch.atan(s / clamp)


class CrossConvolutions(nn.Module):
    """Scale/shift subnetwork mixing neighbouring scales.

    Per scale: conv(k) -> LeakyReLU -> conv(k). The hidden activations of the next-larger scale are
    added through a stride-2 conv, those of the next-smaller scale through bilinear upsampling and a
    conv. Outputs are multiplied by learnable gains initialised at 0, so every coupling starts as the
    identity (stable start of training).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 1024,
        kernel_size: int = 3,
        leaky_slope: float = 0.1,
        n_scales: int = 3,
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.n_scales = n_scales
        self.leaky_slope = leaky_slope
        self.conv_in = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad) for _ in range(n_scales)
        )
        self.conv_out = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad) for _ in range(n_scales)
        )
        # up[i]: from scale i+1 (smaller) to scale i; down[i]: from scale i to scale i+1.
        self.up_convs = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad) for _ in range(n_scales - 1)
        )
        self.down_convs = nn.ModuleList(
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad, stride=2) for _ in range(n_scales - 1)
        )
        self.gamma = nn.Parameter(torch.zeros(n_scales))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [F.leaky_relu(conv(x), self.leaky_slope) for conv, x in zip(self.conv_in, xs, strict=True)]
        outs = [conv(h) for conv, h in zip(self.conv_out, hidden, strict=True)]
        for i in range(self.n_scales - 1):
            up = F.interpolate(hidden[i + 1], scale_factor=2.0, mode="bilinear", align_corners=False)
            outs[i] = outs[i] + self.up_convs[i](up)
            outs[i + 1] = outs[i + 1] + self.down_convs[i](hidden[i])
        return [out * self.gamma[i] for i, out in enumerate(outs)]


class CrossScaleCoupling(nn.Module):
    """Affine coupling on every scale at once (GLOW-style two half-couplings).

    Channels split into halves (a, b). First ``a <- a * exp(s2(b)) + t2(b)``, then
    ``b <- b * exp(s1(a')) + t1(a')``, where (s, t) of all scales come from one CrossConvolutions.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int = 1024,
        kernel_size: int = 3,
        clamp: float = 3.0,
        leaky_slope: float = 0.1,
        n_scales: int = 3,
    ) -> None:
        super().__init__()
        self.len1 = channels // 2
        self.len2 = channels - self.len1
        self.clamp = clamp
        self.sub1 = CrossConvolutions(self.len1, 2 * self.len2, hidden_channels, kernel_size, leaky_slope, n_scales)
        self.sub2 = CrossConvolutions(self.len2, 2 * self.len1, hidden_channels, kernel_size, leaky_slope, n_scales)

    def _split(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [x[:, : self.len1] for x in xs], [x[:, self.len1 :] for x in xs]

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        a, b = self._split(xs)
        logdet = xs[0].new_zeros(xs[0].shape[0])
        ya = []
        for x, r in zip(a, self.sub2(b), strict=True):
            s = soft_clamp(r[:, : self.len1], self.clamp)
            ya.append(x * torch.exp(s) + r[:, self.len1 :])
            logdet = logdet + s.flatten(1).sum(1)
        yb = []
        for x, r in zip(b, self.sub1(ya), strict=True):
            s = soft_clamp(r[:, : self.len2], self.clamp)
            yb.append(x * torch.exp(s) + r[:, self.len2 :])
            logdet = logdet + s.flatten(1).sum(1)
        return [torch.cat(pair, dim=1) for pair in zip(ya, yb, strict=True)], logdet

    def inverse(self, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        ya, yb = self._split(ys)
        b = []
        for y, r in zip(yb, self.sub1(ya), strict=True):
            s = soft_clamp(r[:, : self.len2], self.clamp)
            b.append((y - r[:, self.len2 :]) * torch.exp(-s))
        a = []
        for y, r in zip(ya, self.sub2(b), strict=True):
            s = soft_clamp(r[:, : self.len1], self.clamp)
            a.append((y - r[:, self.len1 :]) * torch.exp(-s))
        return [torch.cat(pair, dim=1) for pair in zip(a, b, strict=True)]


class ChannelPermutation(nn.Module):
    """A fixed random channel permutation per scale (stored as buffers, so saved with the model)."""

    def __init__(self, channels: int, n_scales: int = 3, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        perms = torch.stack([torch.randperm(channels, generator=gen) for _ in range(n_scales)])
        self.register_buffer("perm", perms)
        self.register_buffer("inv_perm", torch.argsort(perms, dim=1))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x[:, p] for x, p in zip(xs, self.perm, strict=True)]

    def inverse(self, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        return [y[:, p] for y, p in zip(ys, self.inv_perm, strict=True)]


class CSFlow(nn.Module):
    """Cross-scale flow: ``n_blocks`` x (permutation, cross-scale affine coupling).

    ``forward(features)`` maps a list of ``n_scales`` feature maps ``(B, C, H/2^i, W/2^i)`` to latent
    maps of the same shapes and returns the exact log|det J| per sample.
    """

    def __init__(
        self,
        channels: int,
        n_blocks: int = 4,
        hidden_channels: int = 1024,
        kernel_sizes: tuple[int, ...] = (3, 3, 3, 5),
        clamp: float = 3.0,
        leaky_slope: float = 0.1,
        n_scales: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(kernel_sizes) != n_blocks:
            raise ValueError(f"kernel_sizes has {len(kernel_sizes)} entries for {n_blocks} blocks")
        self.channels = channels
        self.n_scales = n_scales
        self.permutations = nn.ModuleList(
            ChannelPermutation(channels, n_scales, seed=seed * 1000 + k) for k in range(n_blocks)
        )
        self.couplings = nn.ModuleList(
            CrossScaleCoupling(channels, hidden_channels, k, clamp, leaky_slope, n_scales) for k in kernel_sizes
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        zs = list(features)
        logdet = zs[0].new_zeros(zs[0].shape[0])
        for perm, coupling in zip(self.permutations, self.couplings, strict=True):
            zs, ld = coupling(perm(zs))
            logdet = logdet + ld
        return zs, logdet

    def inverse(self, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = list(zs)
        for perm, coupling in zip(reversed(self.permutations), reversed(self.couplings), strict=True):
            xs = perm.inverse(coupling.inverse(xs))
        return xs


def nll_per_dim(zs: list[torch.Tensor], logdet: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per dimension (up to the constant): mean_b(0.5 * sum z^2 - log|det J|) / D."""
    flat = torch.cat([z.flatten(1) for z in zs], dim=1)
    return torch.mean(0.5 * flat.pow(2).sum(1) - logdet) / flat.shape[1]
