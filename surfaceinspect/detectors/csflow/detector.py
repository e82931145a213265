"""CS-Flow as a :class:`~surfaceinspect.detectors.base.Detector`: training, scoring, saving."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from surfaceinspect.config import RunConfig
from surfaceinspect.detectors.base import Detector, Prediction, TrainContext, TrainProgress, TrainSummary
from surfaceinspect.detectors.loop import StepOutcome, TrainingLoop
from surfaceinspect.detectors.schedule import Throughput
from surfaceinspect.errors import ModelDirError, TrainingError

from .backbones import BACKBONES, MultiScaleFeatures, build_trunk
from .config import CSFlowConfig
from .features import FeatureStore, channel_statistics, normalize_features, whitening_statistics
from .flow import CSFlow, nll_per_dim


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, H, W)`` maps (reflect padding, kernel radius 3 sigma)."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = maps[:, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return out[:, 0]


def image_scores(energy: list[torch.Tensor], maps: torch.Tensor, mode: str, topk: float) -> torch.Tensor:
    """Image scores from the per-scale energies ``z^2/2`` ``(B, C, h, w)`` and the final maps ``(B, H, W)``.

    ``mean`` (paper): mean energy over every position, channel and scale. ``max``: the map's largest
    value. ``topk``: mean of the map's ``max(1, round(topk * H * W))`` largest values.
    """
    if mode == "mean":
        total = sum(e.sum(dim=(1, 2, 3)) for e in energy)
        return total / sum(e[0].numel() for e in energy)
    flat = maps.flatten(1)
    if mode == "max":
        return flat.amax(dim=1)
    if mode == "topk":
        k = max(1, round(topk * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown score mode {mode!r}")


def latent_scores(
    zs: list[torch.Tensor],
    size: tuple[int, int],
    map_mode: str,
    map_sigma: float,
    score_mode: str = "mean",
    score_topk: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores ``(B,)`` (``score_mode``, see :func:`image_scores`) and maps ``(B, H, W)`` of ``size``."""
    energy = [z.float().pow(2).mul_(0.5) for z in zs]
    per_scale = [e.mean(dim=1, keepdim=True) for e in energy]
    if map_mode == "largest":
        maps = F.interpolate(per_scale[0], size=size, mode="bilinear", align_corners=False)
    else:
        # Geometric mean over scales: ranks pixels like the product (anomalib's "all" mode) but
        # stays in the units of z^2/2, like the image score.
        logs = [
            F.interpolate(m, size=size, mode="bilinear", align_corners=False).clamp_min(1e-12).log() for m in per_scale
        ]
        maps = torch.stack(logs).mean(0).exp()
    maps = gaussian_blur(maps[:, 0].contiguous(), map_sigma)
    return image_scores(energy, maps, score_mode, score_topk), maps


class CSFlowInference(torch.nn.Module):
    """CS-Flow's whole inference as one module (what ``export`` writes): images -> (scores, maps)."""

    def __init__(
        self,
        extractor: torch.nn.Module,
        flow: torch.nn.Module,
        norm: list[tuple[torch.Tensor, torch.Tensor]] | None,
        map_mode: str,
        map_sigma: float,
        score_mode: str = "mean",
        score_topk: float = 0.05,
        norm_mode: str = "channel",
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.flow = flow
        self.n_norm = len(norm or [])
        self.norm_mode = norm_mode
        for i, (mean, transform) in enumerate(norm or []):
            self.register_buffer(f"norm_mean_{i}", mean)
            self.register_buffer(f"norm_transform_{i}", transform)
        self.map_mode = map_mode
        self.map_sigma = map_sigma
        self.score_mode = score_mode
        self.score_topk = score_topk

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.extractor(images)
        if self.n_norm:
            norm = [(getattr(self, f"norm_mean_{i}"), getattr(self, f"norm_transform_{i}")) for i in range(self.n_norm)]
            feats = normalize_features(feats, norm, self.norm_mode)
        zs, _ = self.flow(feats)
        size = (images.shape[-2], images.shape[-1])
        return latent_scores(zs, size, self.map_mode, self.map_sigma, self.score_mode, self.score_topk)


# Saved-weights key of each feature_norm's second tensor ("norm.<key>.<scale>"; "std" as in older models).
_NORM_TRANSFORM_KEYS = {"channel": "std", "whiten": "whiten"}


@dataclass
class _Position:
    """Where flow training stands in its epochs (the step count and schedule length are the loop's)."""

    epoch: int  # epochs completed
    batch: int  # batches done in the current epoch
    perm: torch.Tensor  # image order of the current epoch
    steps_per_epoch: int

    @property
    def step(self) -> int:
        """Optimiser steps done."""
        return self.epoch * self.steps_per_epoch + self.batch


class CSFlowDetector(Detector):
    """Fully convolutional cross-scale normalizing flow on frozen EfficientNet features."""

    name = "csflow"
    data_parallel = "surfaceinspect.detectors.csflow.distributed:DistributedCSFlow"
    config_cls = CSFlowConfig

    def __init__(self, run_config: RunConfig, device: torch.device) -> None:
        super().__init__(run_config, device)
        self.extractor: MultiScaleFeatures | None = None
        self.flow: CSFlow | None = None
        self.norm: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per-scale (mean, std), feature_norm

    @property
    def config(self) -> CSFlowConfig:
        return self.run_config.method_config  # type: ignore[return-value]

    # ------------------------------------------------------------------ building

    def _build(self, pretrained: bool) -> None:
        cfg = self.config
        spec = BACKBONES[cfg.backbone]
        with torch.random.fork_rng(devices=[]):  # the flow's initial weights from the seed alone
            torch.manual_seed(self.run_config.common.seed)
            self._build_modules(cfg, spec, pretrained)
        self.extractor.to(self.device)
        self.flow.to(self.device)
        if cfg.channels_last and self.device.type == "cpu":
            self.extractor.to(memory_format=torch.channels_last)
            self.flow.to(memory_format=torch.channels_last)

    def _build_modules(self, cfg: CSFlowConfig, spec: Any, pretrained: bool) -> None:
        trunk = build_trunk(cfg.backbone, cfg.feature_stage, cfg.backbone_weights or None, pretrained=pretrained)
        self.extractor = MultiScaleFeatures(trunk, spec.mean, spec.std, cfg.n_scales, cfg.downscale_mode)
        self.flow = CSFlow(
            channels=spec.channels(cfg.feature_stage),
            n_blocks=cfg.n_blocks,
            hidden_channels=cfg.hidden_channels,
            kernel_sizes=tuple(cfg.kernel_sizes),
            clamp=cfg.clamp,
            leaky_slope=cfg.leaky_slope,
            n_scales=cfg.n_scales,
            seed=self.run_config.common.seed,
        )

    def _layout(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = [f.to(self.device, non_blocking=True) for f in feats]
        feats = normalize_features(feats, self.norm, self.config.feature_norm)
        if self.config.channels_last and self.device.type == "cpu":
            feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        return feats

    def init_random_weights(self) -> None:
        self._build(pretrained=False)

    # ------------------------------------------------------------------ training

    def fit(self, images: torch.Tensor, context: TrainContext) -> TrainSummary:
        cfg = self.config
        cfg.check_resources()  # fail with the one-line message before any work
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"fit expects uint8 images (N, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        if len(images) == 0:
            raise TrainingError("no training images; add good images to the training folder")
        self._build(pretrained=True)
        assert self.extractor is not None
        n = len(images)
        bs = min(self.run_config.common.batch_size, n)
        t0 = time.monotonic()

        def feature_progress(done: int, total: int) -> None:
            context.report(TrainProgress(phase="features", step=done, total=total, optimiser_steps=False))

        store = self._feature_store(images, bs, feature_progress)
        feature_s = time.monotonic() - t0
        self.norm = self._feature_statistics(store, n, bs)
        try:
            summary = self._train_flow(store, n, bs, context, feature_s)
        finally:
            store.close()
        summary.details.update(
            backbone=cfg.backbone,
            feature_stage=cfg.feature_stage,
            feature_seconds=round(feature_s, 2),
            feature_cache=cfg.feature_cache,
        )
        return summary

    def _feature_statistics(
        self, store: FeatureStore, n: int, bs: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The fixed per-scale normalisation of ``csflow.feature_norm`` from the training features."""
        cfg = self.config
        if cfg.feature_norm == "channel":
            return channel_statistics(store, n, bs, self.device)
        if cfg.feature_norm == "whiten":
            return whitening_statistics(store, n, bs, self.device, cfg.whiten_shrinkage)
        return None

    def _feature_store(self, images: torch.Tensor, bs: int, on_progress: Any) -> FeatureStore:
        """The backbone features of all training images, in image order (``csflow.feature_cache``)."""
        cfg = self.config
        assert self.extractor is not None
        return FeatureStore(self.extractor, images, cfg.feature_cache, bs, self.device, cfg.cache_dir, on_progress)

    def _batch_indices(self, perm: torch.Tensor, batch: int, bs: int) -> torch.Tensor:
        """The training images of batch ``batch`` of the epoch ordered by ``perm``."""
        return perm[batch * bs : (batch + 1) * bs]

    def _train_flow(
        self, store: FeatureStore, n: int, bs: int, context: TrainContext, feature_s: float
    ) -> TrainSummary:
        """Train the flow on the stored features (epochs of shuffled batches), resumable mid-epoch."""
        cfg = self.config
        flow = self.flow
        assert flow is not None
        optimizer = torch.optim.Adam(
            flow.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        spe = math.ceil(n / bs)  # steps per epoch
        gen = torch.Generator().manual_seed(self.run_config.common.seed)
        pos, total_epochs = _Position(0, 0, torch.randperm(n, generator=gen), spe), cfg.epochs
        if context.resume_state:
            pos, total_epochs = self._restore(context.resume_state, optimizer, gen, spe)
        start_step = pos.step
        budget = self.time_budget(context.time_budget_s, cfg.epochs * spe, context.elapsed_s, granularity=spe)
        # The first epoch of a fresh run pays for the feature extraction.
        meter = Throughput(spe, one_off_s=feature_s if start_step == 0 else 0.0)
        loop = TrainingLoop(context, budget, meter, step=pos.step, total=total_epochs * spe, granularity=spe)

        def state_fn() -> dict[str, Any]:
            return {
                "flow": flow.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": pos.epoch,
                "batch_in_epoch": pos.batch,
                "step": loop.step,
                "total_epochs": loop.total // spe,
                "perm": pos.perm,
                "rng": gen.get_state(),
            }

        def train_step() -> StepOutcome:
            idx = self._batch_indices(pos.perm, pos.batch, bs)
            loss = self._train_step(store.get(idx), optimizer, pos)
            pos.batch += 1
            if pos.batch == spe:
                pos.epoch, pos.batch = pos.epoch + 1, 0
                pos.perm = torch.randperm(n, generator=gen)
            return StepOutcome(loss, len(idx))

        def epoch_info() -> tuple[dict[str, float], bool]:
            epochs = loop.total // spe
            return {"epoch": min(pos.epoch + 1, epochs), "epochs": epochs}, False

        flow.train()
        loop.run(train_step, state_fn, epoch_info)
        flow.eval()
        return TrainSummary(
            steps=loop.step,
            planned_steps=cfg.epochs * spe,
            epochs=pos.epoch,
            seconds=round(context.elapsed_s(), 2),
            final_loss=loop.loss if loop.loss is not None else float("nan"),
            resumed_from_step=start_step if context.resume_state else None,
            schedule_note=budget.note(loop.total, "epochs", spe),
            **meter.rates(),
        )

    def _restore(
        self, state: dict[str, Any], optimizer: torch.optim.Optimizer, gen: torch.Generator, spe: int
    ) -> tuple[_Position, int]:
        """Load a checkpoint's flow and optimiser state; the position it was written at and the epochs to train."""
        assert self.flow is not None
        self.flow.load_state_dict(state["flow"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        position = _Position(int(state["epoch"]), int(state["batch_in_epoch"]), state["perm"], spe)
        return position, int(state.get("total_epochs", self.config.epochs))

    def _train_step(self, feats: list[torch.Tensor], optimizer: torch.optim.Optimizer, pos: _Position) -> float:
        """One optimiser step of the flow on a batch of features; returns the loss."""
        assert self.flow is not None
        zs, logdet = self.flow(self._layout(feats))
        loss = nll_per_dim(zs, logdet)
        if not torch.isfinite(loss):
            raise self._loss_error(loss.item(), pos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.config.grad_clip)
        optimizer.step()
        return loss.item()

    def _loss_error(self, loss: float, pos: _Position) -> TrainingError:
        cfg = self.config
        return TrainingError(
            f"CS-Flow loss became {loss} at epoch {pos.epoch + 1}, step {pos.step + 1}; lower csflow.lr "
            f"(now {cfg.lr}) or csflow.clamp (now {cfg.clamp}), or check the training images"
        )

    # ------------------------------------------------------------------ inference

    @torch.inference_mode()
    def latents(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Latent maps ``z`` per scale for images ``(B, 3, H, W)`` in [0, 1]."""
        if self.extractor is None or self.flow is None:
            raise RuntimeError("CSFlowDetector: call fit() or load_state_dict() before predict()")
        x = images.to(self.device, non_blocking=True).float()
        if self.config.channels_last and self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        self.flow.eval()
        zs, _ = self.flow(self._layout(self.extractor(x)))
        return zs

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> Prediction:
        h, w = images.shape[-2:]
        return self.prediction_from_latents(self.latents(images), (h, w))

    @torch.inference_mode()
    def prediction_from_latents(self, zs: list[torch.Tensor], size: tuple[int, int]) -> Prediction:
        """Anomaly maps of ``size`` (H, W) and image scores (``csflow.score_mode``, see :func:`image_scores`)."""
        cfg = self.config
        scores, maps = latent_scores(zs, size, cfg.map_mode, cfg.map_sigma, cfg.score_mode, cfg.score_topk)
        return Prediction(scores=scores.float().cpu(), maps=maps.float().cpu().contiguous())

    def inference_module(self) -> torch.nn.Module:
        """``predict`` as one float32 module for export: images (B, 3, H, W) in [0, 1] -> (scores, maps)."""
        if self.extractor is None or self.flow is None:
            raise RuntimeError("CSFlowDetector: call fit() or load_state_dict() before inference_module()")
        cfg = self.config
        return CSFlowInference(
            self.extractor,
            self.flow,
            self.norm,
            cfg.map_mode,
            cfg.map_sigma,
            cfg.score_mode,
            cfg.score_topk,
            norm_mode=cfg.feature_norm,
        ).eval()

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flow and (truncated) backbone weights, so a saved model scores without the weights file."""
        if self.extractor is None or self.flow is None:
            raise RuntimeError("CSFlowDetector: nothing to save before fit()")
        out: dict[str, torch.Tensor] = {}
        for prefix, module in (("flow.", self.flow), ("backbone.", self.extractor.trunk)):
            for key, value in module.state_dict().items():
                out[prefix + key] = value.detach().cpu().contiguous().clone()
        transform_key = _NORM_TRANSFORM_KEYS.get(self.config.feature_norm)
        for i, (mean, transform) in enumerate(self.norm or []):
            out[f"norm.mean.{i}"] = mean.detach().cpu().contiguous().clone()
            out[f"norm.{transform_key}.{i}"] = transform.detach().cpu().contiguous().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._build(pretrained=False)
        assert self.extractor is not None and self.flow is not None
        self.norm = None
        transform_key = _NORM_TRANSFORM_KEYS.get(self.config.feature_norm)
        if transform_key is not None:
            try:
                self.norm = [
                    (state[f"norm.mean.{i}"].to(self.device), state[f"norm.{transform_key}.{i}"].to(self.device))
                    for i in range(self.config.n_scales)
                ]
            except KeyError as exc:
                raise ModelDirError(f"the saved CS-Flow weights lack {exc.args[0]}; retrain the model") from None
        flow_state = {k.removeprefix("flow."): v for k, v in state.items() if k.startswith("flow.")}
        trunk_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        try:
            self.flow.load_state_dict(flow_state, strict=True)
            self.extractor.trunk.load_state_dict(trunk_state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ModelDirError(
                f"the saved CS-Flow weights do not match its configuration ({first}); retrain the model"
            ) from None
        if self.config.channels_last and self.device.type == "cpu":
            self.extractor.to(memory_format=torch.channels_last)
            self.flow.to(memory_format=torch.channels_last)
        self.flow.eval()
