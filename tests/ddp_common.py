"""Shared by tests/test_scaleout_ddp.py and the torchrun worker: the same problem in both processes."""

from __future__ import annotations

import torch

from surfaceinspect.config import CommonConfig, RunConfig
from surfaceinspect.detectors.csflow.config import CSFlowConfig
from surfaceinspect.detectors.draem.config import DraemConfig


def tiny_draem_run(batch_size: int = 4, steps: int = 3) -> RunConfig:
    draem = DraemConfig(
        recon_width=8, disc_width=4, recon_levels=3, disc_levels=3, smoothing_kernel=5, steps=steps, lr=1e-3
    )
    run = RunConfig("draem", "test", CommonConfig(image_size=32, batch_size=batch_size, workers=0, seed=3), draem)
    run.validate()
    return run


def tiny_csflow_run(feature_cache: str = "memory", cache_dir: str = "") -> RunConfig:
    """EfficientNet-Lite0 stage 3 and a 2-block flow at 64 x 64 (as tests/test_csflow.py), 2 epochs of 9 images in
    batches of 4: global batches 4, 4, 1, so 2 ranks split them 2+2, 2+2, 1+0 (a rank without images in a step)."""
    csflow = CSFlowConfig(
        feature_stage=3, hidden_channels=24, n_blocks=2, kernel_sizes=(3, 5), map_sigma=1.0, epochs=2,
        feature_norm="channel", feature_cache=feature_cache, cache_dir=cache_dir, lr=1e-3,
    )  # fmt: skip
    run = RunConfig("csflow", "test", CommonConfig(image_size=64, batch_size=4, workers=0, seed=2), csflow)
    run.validate()
    return run


def training_images(n: int = 8, size: int = 32) -> torch.Tensor:
    """Smooth random textures (uint8, N x 3 x size x size), the same in every process."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return (torch.nn.functional.interpolate(low, size=size, mode="bilinear") * 255).to(torch.uint8)


def linear_problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(5, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
