"""Shared by tests/test_scaleout_ddp.py and the torchrun worker: the same problem in both processes."""

from __future__ import annotations

import torch

from surfaceinspect.config import CommonConfig, RunConfig
from surfaceinspect.detectors.draem.config import DraemConfig


def tiny_draem_run(batch_size: int = 4, steps: int = 3) -> RunConfig:
    draem = DraemConfig(
        recon_width=8, disc_width=4, recon_levels=3, disc_levels=3, smoothing_kernel=5, steps=steps, lr=1e-3
    )
    run = RunConfig("draem", "test", CommonConfig(image_size=32, batch_size=batch_size, workers=0, seed=3), draem)
    run.validate()
    return run


def training_images(n: int = 8) -> torch.Tensor:
    """Smooth random textures (uint8, N x 3 x 32 x 32), the same in every process."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return (torch.nn.functional.interpolate(low, size=32, mode="bilinear") * 255).to(torch.uint8)


def linear_problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(5, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
