"""DRAEM's two subnetworks, with widths and depths as constructor arguments.

Layout follows the authors' model (paper widths: reconstructive 128, discriminative 64):
* reconstructive: encoder of ``levels`` double-conv blocks (3x3 conv + BN + ReLU, x2) with max-pool
  between them, channel multipliers 1, 2, 4, 8, 8, ...; a mirrored decoder (bilinear upsample +
  conv, then a double-conv block); **no skip connections**; 3 output channels.
* discriminative: a U-Net with skips over ``levels`` blocks (paper: 6), input = reconstruction
  concatenated with the image (6 channels), 2-channel logits.
Convs have no bias because BatchNorm follows each of them (the authors' convs carry a redundant one).

``checkpointing=True`` trades compute for memory in training: each block keeps only its input and
recomputes its activations in the backward pass (about one extra forward, the activations of the
full-resolution 128-channel levels no longer held at once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _mults(levels: int) -> list[int]:
    # 1, 2, 4, 8, 8, 8, ... (the authors' widths: bw, 2bw, 4bw, 8bw, 8bw[, 8bw])
    return [min(2**i, 8) for i in range(levels)]


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DoubleConv(nn.Sequential):
    """Two 3x3 conv + BN + ReLU layers."""

    def __init__(self, cin: int, cout: int, mid: int | None = None) -> None:
        mid = cout if mid is None else mid
        super().__init__(conv_bn_relu(cin, mid), conv_bn_relu(mid, cout))


class Up(nn.Sequential):
    """x2 bilinear upsampling followed by conv + BN + ReLU (the authors' ``up`` blocks)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), conv_bn_relu(cin, cout))


@contextlib.contextmanager
def _keep_batchnorm_buffers(block: nn.Module) -> Iterator[None]:
    """Undo the running-statistics update of a recomputed block: BatchNorm must count each batch once."""
    saved = [(b, b.clone()) for m in block.modules() if isinstance(m, nn.BatchNorm2d) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in saved:
                buf.copy_(old)


def run_block(block: nn.Module, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``block(x)``, or with activation checkpointing while training (identical values and gradients)."""
    if not (checkpointing and block.training and torch.is_grad_enabled()):
        return block(x)
    return checkpoint(
        block,
        x,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _keep_batchnorm_buffers(block)),
    )


def encoder_blocks(in_channels: int, channels: list[int]) -> nn.ModuleList:
    """One DoubleConv per level (both subnetworks share this encoder layout; max-pool between levels)."""
    widths = [in_channels, *channels]
    return nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(len(channels)))


class ReconstructiveNet(nn.Module):
    """Encoder-decoder without skips that maps an (augmented) image to its anomaly-free version."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        width: int = 128,
        levels: int = 5,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        ch = [width * m for m in _mults(levels)]
        self.encoder = encoder_blocks(in_channels, ch)
        # Decoder level j (coarse to fine): upsample, then a block that narrows to out[j] = ch[j-1]
        # (authors: 8bw -> 4bw -> 2bw -> bw -> bw for 5 levels).
        ups, blocks, c = [], [], ch[-1]
        for j in range(levels - 2, -1, -1):
            out = ch[max(j - 1, 0)]
            ups.append(Up(c, c))
            blocks.append(DoubleConv(c, out, mid=c))
            c = out
        self.ups, self.decoder = nn.ModuleList(ups), nn.ModuleList(blocks)
        self.head = nn.Conv2d(ch[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cp = self.checkpointing
        for i, block in enumerate(self.encoder):
            x = run_block(block, F.max_pool2d(x, 2) if i else x, cp)
        for up, block in zip(self.ups, self.decoder, strict=True):
            x = run_block(block, run_block(up, x, cp), cp)
        return self.head(x)


class DiscriminativeNet(nn.Module):
    """U-Net that segments the anomaly from (reconstruction, image); returns 2-channel logits."""

    def __init__(
        self,
        in_channels: int = 6,
        out_channels: int = 2,
        width: int = 64,
        levels: int = 6,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        ch = [width * m for m in _mults(levels)]
        self.encoder = encoder_blocks(in_channels, ch)
        # Decoder level j (coarse to fine): upsample to out[j] = ch[j-1] channels, concatenate the
        # encoder's skip (ch[j]) and fuse (authors: 8bw, 4bw, 2bw, bw, bw for 6 levels).
        ups, blocks, c = [], [], ch[-1]
        for j in range(levels - 2, -1, -1):
            out = ch[max(j - 1, 0)]
            ups.append(Up(c, out))
            blocks.append(DoubleConv(out + ch[j], out))
            c = out
        self.ups, self.decoder = nn.ModuleList(ups), nn.ModuleList(blocks)
        self.head = nn.Conv2d(ch[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cp, skips = self.checkpointing, []
        for i, block in enumerate(self.encoder):
            x = run_block(block, F.max_pool2d(x, 2) if i else x, cp)
            skips.append(x)
        for up, block, skip in zip(self.ups, self.decoder, reversed(skips[:-1]), strict=True):
            x = run_block(block, torch.cat((run_block(up, x, cp), skip), dim=1), cp)
        return self.head(x)


class DraemModel(nn.Module):
    """Both subnetworks; ``forward`` returns (reconstruction, segmentation logits)."""

    def __init__(
        self,
        recon_width: int = 128,
        disc_width: int = 64,
        recon_levels: int = 5,
        disc_levels: int = 6,
        in_channels: int = 3,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.recon = ReconstructiveNet(in_channels, in_channels, recon_width, recon_levels, checkpointing)
        self.disc = DiscriminativeNet(2 * in_channels, 2, disc_width, disc_levels, checkpointing)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.recon(x)
        # Order (reconstruction, image) as in the authors' code.
        return rec, self.disc(torch.cat((rec, x), dim=1))


class DraemEnsemble(nn.Module):
    """Independently trained DRAEM models scored as one.

    ``forward`` returns the mean reconstruction and the log of the members' mean anomaly
    probabilities as logits, so a softmax downstream yields exactly the averaged probabilities.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recs, probs = [], []
        for member in self.members:
            rec, logits = member(x)
            recs.append(rec)
            probs.append(torch.softmax(logits.float(), dim=1))
        mean_prob = torch.stack(probs).mean(dim=0)
        return torch.stack(recs).mean(dim=0), torch.log(mean_prob.clamp_min(1e-12))


def init_weights(module: nn.Module) -> None:
    """Paper/authors' init: conv weights N(0, 0.02); BN weights N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Fold every eval-mode ``Conv2d -> BatchNorm2d`` pair of our blocks into one conv (in place)."""
    for name, child in module.named_children():
        if (
            isinstance(child, nn.Sequential)
            and len(child) >= 2
            and isinstance(child[0], nn.Conv2d)
            and isinstance(child[1], nn.BatchNorm2d)
        ):
            child[0] = torch.nn.utils.fusion.fuse_conv_bn_eval(child[0], child[1])
            child[1] = nn.Identity()
        else:
            fuse_conv_bn(child)
        setattr(module, name, child)
    return module
