"""The DRAEM detector: training loop, resumable state, fast CPU inference."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from surfaceinspect.config import RunConfig
from surfaceinspect.detectors.base import Detector, Prediction, TrainContext, TrainProgress
from surfaceinspect.detectors.draem.config import DEFAULT_BUILTIN, DraemConfig
from surfaceinspect.detectors.draem.losses import DraemLoss
from surfaceinspect.detectors.draem.networks import DraemModel, fuse_conv_bn, init_weights
from surfaceinspect.detectors.draem.sources import make_source
from surfaceinspect.detectors.draem.synthesis import (
    GlobalIndexSampler,
    SynthesisDataset,
    SynthesisParams,
    is_grayscale,
    worker_init,
)
from surfaceinspect.errors import ModelDirError, TrainingError

STATE_VERSION = 1
# Steps timed (after one warm-up step) before a time budget shortens the schedule.
BUDGET_PROBE_STEPS = 5
# Probes (of BUDGET_PROBE_STEPS steps each) in the window the step time is measured over.
BUDGET_WINDOW = 6
# Fraction of the remaining budget the schedule may fill (the rest absorbs timing noise).
BUDGET_SAFETY = 0.95
# Input range accepted by predict(): [0, 1] plus rounding slack. ImageNet-normalised images
# reach about -2.1 .. 2.6 and would silently ruin the scores.
INPUT_SLACK = 0.02


def lr_at(step: int, total: int, base_lr: float, milestones: tuple[float, ...], gamma: float) -> float:
    """MultiStep schedule with milestones given as fractions of ``total`` steps."""
    drops = sum(1 for f in milestones if step >= round(f * total))
    return base_lr * gamma**drops


class DraemDetector(Detector):
    """DRAEM: learn to restore and segment synthetic anomalies; score = max of the smoothed mask."""

    name = "draem"
    config_cls = DraemConfig

    def __init__(self, run_config: RunConfig, device: torch.device) -> None:
        super().__init__(run_config, device)
        cfg = self.cfg
        torch.manual_seed(run_config.common.seed)  # identical initial weights for a given seed
        self.model = DraemModel(
            cfg.recon_width,
            cfg.disc_width,
            cfg.recon_levels,
            cfg.disc_levels,
            checkpointing=cfg.activation_checkpointing,
        )
        init_weights(self.model)
        self.model.to(device)
        self.model.eval()
        self._fast: torch.nn.Module | None = None  # fused inference copy, rebuilt when weights change

    @property
    def cfg(self) -> DraemConfig:
        cfg = self.run_config.method_config
        assert isinstance(cfg, DraemConfig)
        return cfg

    # ------------------------------------------------------------------------------------------
    # training

    def fit(self, images: torch.Tensor, context: TrainContext) -> dict[str, Any]:
        cfg, common = self.cfg, self.run_config.common
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"fit() expects uint8 images (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        threads_before = torch.get_num_threads()
        if common.threads > 0:
            torch.set_num_threads(common.threads)  # restored on return: the setting is process-wide
        n, batch = images.shape[0], common.batch_size
        nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        grey = cfg.match_grayscale and is_grayscale(nhwc)
        params = SynthesisParams(
            anomaly_prob=cfg.anomaly_prob,
            opacity_range=tuple(cfg.opacity_range),
            perlin_scale_range=tuple(cfg.perlin_scale_range),
            perlin_threshold=cfg.perlin_threshold,
            augment_ops=cfg.augment_ops,
            grayscale=grey,
        )
        dataset = SynthesisDataset(nhwc, make_source(cfg.anomaly_source, nhwc), params, common.seed)

        steps_per_epoch = math.ceil(n / batch)
        total = cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch
        planned = total
        optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        step, budget_note = 0, ""
        resume = context.resume_state
        if resume is not None:
            if int(resume.get("version", -1)) != STATE_VERSION:
                raise TrainingError("the checkpoint was written by another DRAEM version; start training afresh")
            self.model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            step = int(resume["step"])
            total = int(resume["scheduler"]["total_steps"])
            planned = int(resume["scheduler"].get("planned_steps", total))
            torch.set_rng_state(resume["rng"])
        start_step = step
        loss_fn = DraemLoss(cfg.ssim_window, cfg.focal_gamma, cfg.focal_weight)

        def state_fn() -> dict[str, Any]:
            return {
                "version": STATE_VERSION,
                "model": self.model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": {
                    "total_steps": total,
                    "planned_steps": planned,
                    "milestones": list(cfg.lr_milestones),
                    "gamma": cfg.lr_gamma,
                },
                "step": step,
                "rng": torch.get_rng_state(),
            }

        loader = DataLoader(
            dataset,
            batch_size=batch,
            sampler=GlobalIndexSampler(step * batch),
            num_workers=common.workers,
            worker_init_fn=worker_init if common.workers > 0 else None,
            prefetch_factor=4 if common.workers > 0 else None,
        )
        self.model.train()
        self._fast = None
        recent: list[float] = []
        parts: dict[str, float] = {}
        t_start = time.monotonic()
        probes: list[tuple[int, float]] = []  # (step, time) every BUDGET_PROBE_STEPS steps
        t_epoch1: float | None = None
        budget_s = float(context.time_budget_s or 0.0)
        context.report(TrainProgress("train", step, total), state_fn)
        try:
            for batch_data in loader:
                if step >= total:
                    break
                lr = lr_at(step, total, cfg.lr, tuple(cfg.lr_milestones), cfg.lr_gamma)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                image = batch_data["image"].to(self.device, non_blocking=True)
                augmented = batch_data["augmented"].to(self.device, non_blocking=True)
                mask = batch_data["mask"].to(self.device, non_blocking=True)
                rec, logits = self.model(augmented)
                loss, parts = loss_fn(rec, image, logits, mask)
                if "nonfinite" in parts:
                    raise TrainingError(
                        f"DRAEM loss became non-finite at step {step + 1} ({parts}); lower draem.lr "
                        f"(now {cfg.lr:g}) or check the training images"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                recent = [*recent[-49:], float(loss.detach())]
                if step - start_step == steps_per_epoch:
                    t_epoch1 = time.monotonic()

                # Time budget: time a few steps after the first (which pays one-off costs), then
                # shorten the schedule (milestones stay at the same fractions) to end in time.
                # The estimate is redone every few steps over a recent window, so the schedule follows
                # the machine's load (it may grow back, never beyond the planned steps).
                done = step - start_step
                if budget_s > 0 and done >= 1 and (done - 1) % BUDGET_PROBE_STEPS == 0:
                    probes.append((step, time.monotonic()))
                    if len(probes) > 1:
                        (s0, t0), (s1, t1) = probes[max(0, len(probes) - 1 - BUDGET_WINDOW)], probes[-1]
                        per_step = (t1 - t0) / (s1 - s0)
                        remaining = budget_s * BUDGET_SAFETY - context.elapsed_s()
                        new_total = min(planned, step + max(0, int(remaining / per_step)))
                        if new_total != total:
                            total = new_total
                            budget_note = (
                                f"schedule set to {total} of {planned} planned steps to fit the time budget"
                                if total < planned
                                else ""
                            )

                context.report(
                    TrainProgress("train", step, total, float(loss.detach()), {"lr": lr, **parts}),
                    state_fn,
                )
        finally:
            del loader
            self.model.eval()
            self._fast = None
            torch.set_num_threads(threads_before)
        t_end = time.monotonic()
        seconds = t_end - t_start
        done = step - start_step
        first = min(done, steps_per_epoch) * batch
        first_s = (t_epoch1 or t_end) - t_start
        later_s = t_end - t_epoch1 if t_epoch1 is not None else 0.0
        return {
            "steps": step,
            "planned_steps": planned,
            "epochs": round(step * batch / n, 3),
            "final_loss": float(np.mean(recent)) if recent else None,
            "final_loss_parts": parts,
            "seconds": round(context.elapsed_s(), 1),  # includes the time before a resume (engine)
            "images_per_s": round(done * batch / max(seconds, 1e-9), 3),
            # "first epoch" = the first pass of this call (it includes worker start-up and warm-up).
            "images_per_s_first_epoch": round(first / max(first_s, 1e-9), 3) if done else None,
            "images_per_s_later_epochs": (
                round((done - steps_per_epoch) * batch / later_s, 3) if later_s > 0 and done > steps_per_epoch else None
            ),
            "resumed_from_step": start_step if resume is not None else None,
            "anomaly_source": DEFAULT_BUILTIN if cfg.anomaly_source == "builtin" else cfg.anomaly_source,
            "grey_textures": grey,
            "time_budget": budget_note or None,
        }

    # ------------------------------------------------------------------------------------------
    # inference

    def _inference_model(self) -> torch.nn.Module:
        if self._fast is None:
            fast = copy.deepcopy(self.model).eval()
            if self.cfg.fuse_bn:
                fuse_conv_bn(fast)  # one conv instead of conv + BN: fewer passes over memory
            self._fast = fast.to(memory_format=torch.channels_last)
        return self._fast

    def predict(self, images: torch.Tensor) -> Prediction:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"predict() expects images (B, 3, S, S), got {tuple(images.shape)}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -INPUT_SLACK or hi > 1.0 + INPUT_SLACK:
            raise ValueError(
                f"DRAEM expects images scaled to [0, 1], got values in [{lo:.2f}, {hi:.2f}]; "
                "pass raw RGB/255 without ImageNet mean/std normalisation"
            )
        model = self._inference_model()
        x = images.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
        k = self.cfg.smoothing_kernel
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.inference_bf16),
        ):
            _, logits = model(x)
        with torch.inference_mode():
            prob = F.softmax(logits.float(), dim=1)[:, 1:]
            # Mean filter; count_include_pad=False keeps it a true mean at the borders (the
            # authors' zero padding would damp defects that touch the image edge).
            smooth = F.avg_pool2d(prob, k, stride=1, padding=k // 2, count_include_pad=False)[:, 0]
            scores = smooth.flatten(1).amax(dim=1)
        return Prediction(scores=scores.float().cpu().contiguous(), maps=smooth.float().cpu().contiguous())

    # ------------------------------------------------------------------------------------------
    # persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ModelDirError(
                f"DRAEM weights do not fit this configuration (widths/levels differ?): {first}; "
                "use the config saved with the model"
            ) from None
        self.model.to(self.device).eval()
        self._fast = None
