"""The DRAEM detector: training loop, resumable state, fast CPU inference."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from surfaceinspect.config import RunConfig
from surfaceinspect.detectors.base import Detector, Prediction, TrainContext, TrainSummary
from surfaceinspect.detectors.draem.config import DEFAULT_BUILTIN, DraemConfig
from surfaceinspect.detectors.draem.losses import DraemLoss
from surfaceinspect.detectors.draem.networks import DraemEnsemble, DraemModel, fuse_conv_bn, init_weights
from surfaceinspect.detectors.draem.sources import AnomalySource, make_source
from surfaceinspect.detectors.draem.synthesis import (
    GlobalIndexSampler,
    SynthesisDataset,
    SynthesisParams,
    is_grayscale,
    worker_init,
)
from surfaceinspect.detectors.draem.validation import EarlyStopping, SyntheticValidationSet, split_validation
from surfaceinspect.detectors.loop import StepOutcome, TrainingLoop
from surfaceinspect.detectors.schedule import Throughput
from surfaceinspect.errors import ConfigError, ModelDirError, TrainingError

STATE_VERSION = 1
# Input range accepted by predict(): [0, 1] plus rounding slack. ImageNet-normalised images
# reach about -2.1 .. 2.6 and would silently ruin the scores.
INPUT_SLACK = 0.02


def lr_at(step: int, total: int, base_lr: float, milestones: tuple[float, ...], gamma: float) -> float:
    """MultiStep schedule with milestones given as fractions of ``total`` steps."""
    drops = sum(1 for f in milestones if step >= round(f * total))
    return base_lr * gamma**drops


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``draem.train_precision`` on ``device`` (float32 = no autocast)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def smoothed_max(prob: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(B,)`` and maps ``(B, H, W)`` from anomaly probabilities ``(B, 1, H, W)``: mean filter, then max."""
    # count_include_pad=False keeps it a true mean at the borders (the authors' zero padding
    # would damp defects that touch the image edge).
    smooth = F.avg_pool2d(prob, kernel, stride=1, padding=kernel // 2, count_include_pad=False)[:, 0]
    return smooth.flatten(1).amax(dim=1), smooth


def mask_scores(logits: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(B,)`` and maps ``(B, H, W)`` from the discriminator's logits: smoothed anomaly probability."""
    return smoothed_max(F.softmax(logits.float(), dim=1)[:, 1:], kernel)


class DraemInference(torch.nn.Module):
    """DRAEM's whole inference as one module (what ``export`` writes): images -> (scores, maps)."""

    def __init__(self, model: torch.nn.Module, kernel: int) -> None:
        super().__init__()
        self.model = model
        self.kernel = kernel

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, logits = self.model(images)
        return mask_scores(logits, self.kernel)


@dataclass
class _MemberRun:
    """What training one model (of an ensemble) leaves for the summary."""

    index: int
    steps: int
    planned: int
    start_step: int
    final_loss: float | None
    parts: dict[str, float]
    note: str | None
    validation: dict[str, Any] | None
    grayscale: bool


@dataclass
class _Position:
    """Where training stands: the resumable part of the schedule."""

    step: int  # optimiser steps done
    total: int  # steps to train (the plan, or fewer to fit a time budget)
    planned: int  # steps the configuration asked for


class DraemDetector(Detector):
    """DRAEM: learn to restore and segment synthetic anomalies; score = max of the smoothed mask."""

    name = "draem"
    data_parallel = "surfaceinspect.detectors.draem.distributed:DistributedDraem"
    config_cls = DraemConfig

    def __init__(self, run_config: RunConfig, device: torch.device) -> None:
        super().__init__(run_config, device)
        cfg = self.cfg
        nets = []
        for index in range(cfg.members):
            # Initial weights from the seed alone (model i of an ensemble: seed + i), global RNG untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(run_config.common.seed + index)
                net = DraemModel(
                    cfg.recon_width,
                    cfg.disc_width,
                    cfg.recon_levels,
                    cfg.disc_levels,
                    checkpointing=cfg.activation_checkpointing,
                )
                init_weights(net)
            nets.append(net)
        self.model: torch.nn.Module = nets[0] if cfg.members == 1 else DraemEnsemble(nets)
        self.model.to(device)
        self.model.eval()
        self._fast: torch.nn.Module | None = None  # fused inference copy, rebuilt when weights change
        # Training arithmetic and layout, set by fit(): autocast dtype (draem.train_precision) and
        # NHWC on CUDA, where it lets cuDNN use its tensor-core kernels for the 3x3 convs.
        self._amp_dtype = torch.float32
        self._train_layout = torch.contiguous_format

    @property
    def cfg(self) -> DraemConfig:
        cfg = self.run_config.method_config
        assert isinstance(cfg, DraemConfig)
        return cfg

    # ------------------------------------------------------------------------------------------
    # training

    def fit(self, images: torch.Tensor, context: TrainContext) -> TrainSummary:
        cfg, common = self.cfg, self.run_config.common
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"fit() expects uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        if cfg.val_every > 0 and nhwc.shape[0] - cfg.val_images < 2:
            raise ConfigError(
                f"draem.val_images={cfg.val_images} leaves fewer than 2 of the {nhwc.shape[0]} training images "
                "to train on; lower draem.val_images or set draem.val_every=0"
            )
        state = context.resume_state
        if state is not None and int(state.get("version", -1)) != STATE_VERSION:
            raise TrainingError("the checkpoint was written by another DRAEM version; start training afresh")
        first = int(state.get("member", 0)) if state is not None else 0
        # Steps of the models finished before an interruption (an ensemble's checkpoint carries them).
        done_before: list[int] = [int(v) for v in state.get("members_done", [])] if state is not None else []
        if state is not None:
            self.model.load_state_dict(state["model"])  # every model: the finished ones and the one in progress
        meter = Throughput(math.ceil(nhwc.shape[0] / common.batch_size))
        runs: list[_MemberRun] = []
        for index in range(first, cfg.members):
            done = done_before + [r.steps for r in runs]
            runs.append(self._fit_member(index, nhwc, context, state if index == first else None, meter, done))
        last = runs[-1]
        notes = [f"model {r.index + 1}: {r.note}" if cfg.members > 1 else r.note for r in runs if r.note]
        details: dict[str, Any] = {
            "final_loss_parts": last.parts,
            "anomaly_source": DEFAULT_BUILTIN if cfg.anomaly_source == "builtin" else cfg.anomaly_source,
            "grey_textures": last.grayscale,
            "train_precision": "bf16" if self._amp_dtype == torch.bfloat16 else "fp32",
        }
        if last.validation is not None:
            details["validation"] = last.validation
        if cfg.members > 1:
            details["members"] = [
                {"model": r.index + 1, "seed": common.seed + r.index, "steps": r.steps, "planned_steps": r.planned}
                | ({"validation": r.validation} if r.validation is not None else {})
                for r in runs
            ]
        steps = sum(done_before) + sum(r.steps for r in runs)
        n_train = nhwc.shape[0] - (cfg.val_images if cfg.val_every > 0 else 0)
        return TrainSummary(
            steps=steps,
            planned_steps=runs[0].planned * cfg.members,
            epochs=round(steps * common.batch_size / n_train, 3),
            seconds=round(context.elapsed_s(), 1),
            final_loss=last.final_loss,
            resumed_from_step=runs[0].start_step if state is not None else None,
            schedule_note="; ".join(notes) if notes else None,
            **meter.rates(),
            details=details,
        )

    def _member_net(self, index: int) -> torch.nn.Module:
        return self.model.members[index] if isinstance(self.model, DraemEnsemble) else self.model

    def _fit_member(
        self,
        index: int,
        all_nhwc: np.ndarray,
        context: TrainContext,
        resume_state: dict[str, Any] | None,
        meter: Throughput,
        members_done: list[int],
    ) -> _MemberRun:
        """Train model ``index`` of the ensemble (the only one without ``draem.members``), as a plain
        run with seed ``common.seed + index`` would train it."""
        cfg, common = self.cfg, self.run_config.common
        net = self._member_net(index)
        seed = common.seed + index
        batch = common.batch_size
        nhwc, held_out = all_nhwc, None
        if cfg.val_every > 0:
            train_idx, val_idx = split_validation(all_nhwc.shape[0], cfg.val_images, seed)
            held_out, nhwc = all_nhwc[val_idx], all_nhwc[train_idx]
        source, params = self._synthesis_recipe(nhwc)
        dataset = self._synthesis_dataset(nhwc, source, params, seed)
        validation = SyntheticValidationSet(held_out, source, params, seed) if held_out is not None else None
        stopper = EarlyStopping(cfg.val_patience)
        if validation is not None and resume_state is not None and "validation" in resume_state:
            stopper.load_state_dict(resume_state["validation"])
        planned = cfg.steps if cfg.steps > 0 else cfg.epochs * math.ceil(nhwc.shape[0] / batch)
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        position = self._restore(resume_state, optimizer) or _Position(0, planned, planned)
        start_step = position.step
        loss_fn = DraemLoss(cfg.ssim_window, cfg.focal_gamma, cfg.focal_weight)
        # Model i must end by (i + 1) / members of the budget: each gets an equal share.
        budget = self.time_budget(
            context.time_budget_s * (index + 1) / cfg.members, position.planned, context.elapsed_s
        )
        phase = "train" if cfg.members == 1 else f"model {index + 1}/{cfg.members}"
        loop = TrainingLoop(context, budget, meter, step=position.step, total=position.total, phase=phase)

        def state_fn() -> dict[str, Any]:
            scheduler = {"total_steps": loop.total, "planned_steps": position.planned}
            scheduler |= {"milestones": list(cfg.lr_milestones), "gamma": cfg.lr_gamma}
            return {
                "version": STATE_VERSION,
                "member": index,
                "members_done": members_done,
                "model": self.model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler,
                "step": loop.step,
                **({"validation": stopper.state_dict()} if validation is not None else {}),
            }

        loader: DataLoader | None = self._loader(dataset, position.step * batch)
        batches: Any = iter(loader)
        recent: list[float] = []
        last: dict[str, Any] = {"lr": cfg.lr, "parts": {}}

        def train_step() -> StepOutcome:
            lr = lr_at(loop.step, loop.total, cfg.lr, tuple(cfg.lr_milestones), cfg.lr_gamma)
            loss, last["parts"] = self._train_step(net, next(batches), optimizer, loss_fn, lr, loop.step)
            last["lr"] = lr
            recent[:] = [*recent[-49:], loss]
            return StepOutcome(loss, batch)

        def after_step() -> tuple[dict[str, float], bool]:
            # The milestones stay at the same fractions of a shortened schedule (lr_at reads loop.total).
            info = {"lr": last["lr"], **last["parts"]}
            if validation is not None and (loop.step % cfg.val_every == 0 or loop.step >= loop.total):
                info["val_pixel_ap"] = self._validate(net, validation, stopper, loop.step)
            return info, validation is not None and stopper.should_stop

        self._begin_training(net)
        try:
            loop.run(train_step, state_fn, after_step)
        finally:
            batches = loader = None  # ends the loader's worker processes
            self.model.eval()
            self._fast = None
        held = len(held_out) if held_out is not None else 0
        note, summary = self._validation_outcome(net, budget.note(loop.total), loop, validation, stopper, held)
        return _MemberRun(
            index=index,
            steps=loop.step,
            planned=position.planned,
            start_step=start_step,
            final_loss=float(np.mean(recent)) if recent else None,
            parts=last["parts"],
            note=note,
            validation=summary,
            grayscale=params.grayscale,
        )

    def _validation_outcome(
        self,
        net: torch.nn.Module,
        note: str | None,
        loop: TrainingLoop,
        validation: SyntheticValidationSet | None,
        stopper: EarlyStopping,
        held_out_images: int,
    ) -> tuple[str | None, dict[str, Any] | None]:
        """After training with synthetic validation: keep the best weights; the schedule note and the
        validation summary (None without validation)."""
        if validation is None:
            return note, None
        cfg = self.cfg
        stopped = stopper.should_stop and loop.step < loop.total
        if stopper.best_weights is not None and stopper.best_step != loop.step:
            net.load_state_dict(stopper.best_weights)
        summary = {
            "every": cfg.val_every,
            "images": held_out_images,
            "samples": len(validation),
            "best_step": stopper.best_step,
            "best_pixel_ap": round(stopper.best_score, 5),
            "stopped_early": stopped,
            "history": stopper.history,
        }
        if stopped:
            early = (
                f"stopped early at step {loop.step}: synthetic-validation pixel AP had not improved for "
                f"{cfg.val_patience} evaluations; kept the weights of step {stopper.best_step}"
            )
            note = f"{note}; {early}" if note else early
        return note, summary

    def _begin_training(self, net: torch.nn.Module) -> None:
        """Training arithmetic and layout (draem.train_precision; NHWC on CUDA), ``net`` in training mode."""
        self._amp_dtype = training_dtype(self.cfg.train_precision, self.device)
        if self.device.type == "cuda":
            self._train_layout = torch.channels_last
            self.model.to(memory_format=self._train_layout)
        net.train()
        self._fast = None

    def _loader(self, dataset: Any, start: int) -> DataLoader:
        """The endless loader of synthesised training samples from global sample index ``start`` on."""
        common = self.run_config.common
        return DataLoader(
            dataset,
            batch_size=common.batch_size,
            sampler=GlobalIndexSampler(start),
            num_workers=common.workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init if common.workers > 0 else None,
            prefetch_factor=4 if common.workers > 0 else None,
        )

    def _validate(
        self, net: torch.nn.Module, validation: SyntheticValidationSet, stopper: EarlyStopping, step: int
    ) -> float:
        """Score the held-out synthetic set with ``net``'s current weights and update the early stopper."""
        net.eval()
        try:
            ap = validation.pixel_ap(net, self.device)
        finally:
            net.train()
        stopper.update(step, ap, net)
        return ap

    def _synthesis_recipe(self, nhwc: np.ndarray) -> tuple[AnomalySource, SynthesisParams]:
        """The anomaly source and synthesis settings for uint8 (N, H, W, 3) training images."""
        cfg = self.cfg
        params = SynthesisParams(
            anomaly_prob=cfg.anomaly_prob,
            opacity_range=tuple(cfg.opacity_range),
            perlin_scale_range=tuple(cfg.perlin_scale_range),
            perlin_threshold=cfg.perlin_threshold,
            augment_ops=cfg.augment_ops,
            grayscale=cfg.match_grayscale and is_grayscale(nhwc),
            crack_prob=cfg.crack_prob,
            patch_prob=cfg.patch_prob,
            rotate_prob=cfg.rotate_prob,
            crack_fill=cfg.crack_fill,
        )
        return make_source(cfg.anomaly_source, nhwc), params

    def _synthesis_dataset(
        self, nhwc: np.ndarray, source: AnomalySource, params: SynthesisParams, seed: int
    ) -> Dataset:
        """The endless dataset of (good, augmented, mask) samples from uint8 (N, H, W, 3) images."""
        cfg = self.cfg
        h, w = nhwc.shape[1:3]
        if cfg.train_crop > min(h, w):
            raise ConfigError(
                f"draem.train_crop={cfg.train_crop} is larger than the {h}x{w} training inputs; "
                "use a smaller crop or a larger common.image_size"
            )
        crop = cfg.train_crop if cfg.train_crop < max(h, w) else 0
        return SynthesisDataset(nhwc, source, params, seed, crop)

    def _restore(self, state: dict[str, Any] | None, optimizer: torch.optim.Optimizer) -> _Position | None:
        """Load a checkpoint's optimiser state (fit() has checked it and loaded the weights); its position."""
        if state is None:
            return None
        optimizer.load_state_dict(state["optimizer"])
        total = int(state["scheduler"]["total_steps"])
        return _Position(int(state["step"]), total, int(state["scheduler"].get("planned_steps", total)))

    def _train_step(
        self,
        net: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        loss_fn: DraemLoss,
        lr: float,
        step: int,
    ) -> tuple[float, dict[str, float]]:
        """One optimiser step of ``net`` on a synthesised batch; returns the loss and its parts."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        image = batch["image"].to(self.device, non_blocking=True)
        augmented = batch["augmented"].to(self.device, non_blocking=True).contiguous(memory_format=self._train_layout)
        mask = batch["mask"].to(self.device, non_blocking=True)
        dtype = self._amp_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            rec, logits = net(augmented)
        loss, parts = loss_fn(rec.float(), image, logits.float(), mask)
        if "nonfinite" in parts:
            raise TrainingError(
                f"DRAEM loss became non-finite at step {step + 1} ({parts}); lower draem.lr (now {self.cfg.lr:g}) "
                "or check the training images"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach()), parts

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
            raise ValueError(f"predict() expects images (B, 3, H, W), got {tuple(images.shape)}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -INPUT_SLACK or hi > 1.0 + INPUT_SLACK:
            raise ValueError(
                f"DRAEM expects images scaled to [0, 1], got values in [{lo:.2f}, {hi:.2f}]; "
                "pass raw RGB/255 without ImageNet mean/std normalisation"
            )
        model = self._inference_model()
        x = images.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.inference_bf16),
        ):
            _, logits = model(x)
        with torch.inference_mode():
            scores, smooth = mask_scores(logits, self.cfg.smoothing_kernel)
        return Prediction(scores=scores.float().cpu().contiguous(), maps=smooth.float().cpu().contiguous())

    def inference_module(self) -> torch.nn.Module:
        """``predict`` as one float32 module for export: images (B, 3, H, W) in [0, 1] -> (scores, maps)."""
        return DraemInference(self._inference_model(), self.cfg.smoothing_kernel).eval()

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
