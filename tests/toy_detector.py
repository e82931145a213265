"""A tiny deterministic detector for engine and CLI tests (registered only inside the tests).

Per-pixel mean of the good images after 4x4 average pooling, one global spread; the map is the
channel-mean absolute z-score, the score its maximum. "Training" walks the images one step at a
time for ``epochs`` epochs, accumulating sums, so checkpoints and resume can be exercised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from surfaceinspect.config import MethodConfig
from surfaceinspect.detectors.base import Detector, Prediction, TrainContext, TrainProgress, TrainSummary


@dataclass
class ToyConfig(MethodConfig):
    method: ClassVar[str] = "toy"
    epochs: int = 2
    lr: float = 1.0
    pool: int = 4
    fail_at_step: int = -1  # raise KeyboardInterrupt at this global step (simulates a kill)
    step_delay_s: float = 0.0  # slow training down so a test can kill it mid-run
    predict_delay_s: float = 0.0  # slow scoring down so a test can kill it mid-run
    blind: bool = False  # score every image alike (a detector known to be useless, for --method auto's tests)
    # "brightness": score = mean pixel value, a stand-in for a detector whose scores follow the lighting
    # (drift tests); "zmax": the maximum of the z-score map
    score: str = "zmax"
    profile_notes: ClassVar[dict[str, str]] = {"cpu": "tests: a per-pixel mean, trained in seconds"}


class ToyDetector(Detector):
    name = "toy"
    config_cls = ToyConfig

    def __init__(self, run_config, device) -> None:
        super().__init__(run_config, device)
        h, w = (side // self.config.pool for side in self.input_size)
        self.mean = torch.zeros(3, h, w)
        self.std = torch.ones(3, h, w)

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images.float(), self.config.pool)

    def fit(self, images: torch.Tensor, context: TrainContext) -> TrainSummary:
        n = images.shape[0]
        total = n * self.config.epochs
        state = context.resume_state or {
            "step": 0,
            "sum": torch.zeros_like(self.mean),
            "sq": torch.zeros_like(self.mean),
        }
        step, acc, sq = int(state["step"]), state["sum"].clone(), state["sq"].clone()
        while step < total:
            x = self._pooled(images[step % n : step % n + 1] / 255.0)[0]
            acc += x
            sq += x * x
            step += 1
            time.sleep(self.config.step_delay_s)
            if step == self.config.fail_at_step and context.resume_state is None:
                raise KeyboardInterrupt

            def state_fn(step=step, acc=acc, sq=sq):
                return {"step": step, "sum": acc.clone(), "sq": sq.clone()}

            self._estimate(acc, sq, step)  # a paused detector (--method auto's probes) scores with what it has
            context.report(TrainProgress("train", step, total, loss=float(x.mean())), state_fn)
        self._estimate(acc, sq, total)
        return TrainSummary(
            steps=step,
            planned_steps=total,
            epochs=float(self.config.epochs),
            seconds=context.elapsed_s(),
            final_loss=None,
        )

    def _estimate(self, acc: torch.Tensor, sq: torch.Tensor, count: int) -> None:
        self.mean = acc / count
        # one robust spread for the whole image: per-pixel estimates from a few images are too noisy
        self.std = (sq / count - self.mean**2).clamp_min(1e-6).mean().sqrt().expand_as(self.mean).clone() + 0.01

    def predict(self, images: torch.Tensor) -> Prediction:
        time.sleep(self.config.predict_delay_s)
        scores, maps = self.inference_module()(images)
        return Prediction(scores=scores, maps=maps)

    def inference_module(self) -> torch.nn.Module:
        return ToyModule(self.mean, self.std, self.config)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"mean", "std"} or state["mean"].shape != self.mean.shape:
            raise RuntimeError("toy state does not fit")
        self.mean, self.std = state["mean"].clone(), state["std"].clone()


class ToyModule(torch.nn.Module):
    """The toy's ``predict`` as a module (so the contract test can export it)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, config: ToyConfig) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.pool, self.blind, self.brightness = config.pool, config.blind, config.score == "brightness"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = ((F.avg_pool2d(images.float(), self.pool) - self.mean) / self.std).abs().mean(1, keepdim=True)
        z = F.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)
        maps = F.interpolate(z, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        if self.blind:
            maps = torch.zeros_like(maps)
        if self.brightness:
            return images.float().mean(dim=(1, 2, 3)), images.float().mean(1)
        return maps.flatten(1).max(1).values.float(), maps.float()
