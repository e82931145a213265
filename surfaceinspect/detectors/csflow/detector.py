"""CS-Flow as a :class:`~surfaceinspect.detectors.base.Detector`: training, scoring, saving."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from surfaceinspect.config import RunConfig
from surfaceinspect.detectors.base import Detector, Prediction, TrainContext, TrainProgress
from surfaceinspect.errors import ModelDirError, TrainingError

from .backbones import BACKBONES, MultiScaleFeatures, build_trunk
from .config import CSFlowConfig
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


class FeatureStore:
    """Backbone features of the training set, extracted once (``memory`` / ``disk``) or on demand (``none``)."""

    def __init__(
        self,
        extractor: MultiScaleFeatures,
        images: torch.Tensor,
        mode: str,
        batch_size: int,
        device: torch.device,
        cache_dir: str = "",
        on_progress: Any = None,
    ) -> None:
        self.extractor = extractor
        self.images = images
        self.mode = mode
        self.device = device
        self._tmpdir: Path | None = None
        self.arrays: list[Any] = []
        n = len(images)
        if mode == "none":
            return
        done = 0
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            feats = self._compute(idx)
            if not self.arrays:
                self._allocate(n, [f.shape[1:] for f in feats], cache_dir)
            for store, f in zip(self.arrays, feats, strict=True):
                if mode == "disk":
                    store[start : start + len(idx)] = f.numpy()
                else:
                    store[start : start + len(idx)].copy_(f)
            done += len(idx)
            if on_progress is not None:
                on_progress(done, n)
        if mode == "disk":
            for store in self.arrays:
                store.flush()

    @classmethod
    def from_arrays(cls, arrays: list[torch.Tensor], device: torch.device) -> FeatureStore:
        """A store over features computed elsewhere (e.g. cached by a benchmark)."""
        store = cls.__new__(cls)
        store.mode, store.device, store._tmpdir, store.arrays = "memory", device, None, list(arrays)
        return store

    def _allocate(self, n: int, shapes: list[torch.Size], cache_dir: str) -> None:
        if self.mode == "memory":
            self.arrays = [torch.empty((n, *shape), dtype=torch.float32) for shape in shapes]
            return
        self._tmpdir = Path(tempfile.mkdtemp(prefix="csflow-features-", dir=cache_dir or None))
        self.arrays = [
            np.lib.format.open_memmap(
                self._tmpdir / f"scale{i}.npy", mode="w+", dtype=np.float32, shape=(n, *tuple(shape))
            )
            for i, shape in enumerate(shapes)
        ]

    def _compute(self, idx: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            x = self.images[idx].to(self.device, non_blocking=True).float().div_(255.0)
            feats = [f.float().cpu() for f in self.extractor(x)]
        for f in feats:
            if not torch.isfinite(f).all():
                raise TrainingError(
                    f"backbone features of training images {int(idx[0])}..{int(idx[-1])} are not finite; "
                    "check those images and the backbone weights file"
                )
        return [f.clone() for f in feats]  # clone: a normal tensor, usable by autograd

    def get(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Features of training images ``idx`` (CPU float32), one tensor per scale."""
        if self.mode == "none":
            return self._compute(idx)
        if self.mode == "disk":
            order = np.sort(idx.numpy())  # sorted reads are sequential on disk; the order is restored below
            back = np.argsort(np.argsort(idx.numpy()))
            return [torch.from_numpy(np.ascontiguousarray(a[order][back])) for a in self.arrays]
        return [a[idx] for a in self.arrays]

    def close(self) -> None:
        self.arrays = []
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def channel_statistics(
    store: FeatureStore, n: int, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-scale, per-channel mean and std of the training features, shaped ``(1, C, 1, 1)``."""
    sums: list[torch.Tensor] = []
    sqs: list[torch.Tensor] = []
    counts: list[int] = []
    for start in range(0, n, batch_size):
        feats = store.get(torch.arange(start, min(start + batch_size, n)))
        if not sums:
            sums = [torch.zeros(f.shape[1], dtype=torch.float64) for f in feats]
            sqs = [torch.zeros(f.shape[1], dtype=torch.float64) for f in feats]
            counts = [0] * len(feats)
        for i, f in enumerate(feats):
            f = f.double()
            sums[i] += f.sum(dim=(0, 2, 3))
            sqs[i] += f.pow(2).sum(dim=(0, 2, 3))
            counts[i] += f.shape[0] * f.shape[2] * f.shape[3]
    out = []
    for s, q, c in zip(sums, sqs, counts, strict=True):
        mean = s / c
        std = (q / c - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-3)  # dead channels: no division blow-up
        out.append((mean.float().view(1, -1, 1, 1).to(device), std.float().view(1, -1, 1, 1).to(device)))
    return out


class CSFlowDetector(Detector):
    """Fully convolutional cross-scale normalizing flow on frozen EfficientNet features."""

    name = "csflow"
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
        self.extractor.to(self.device)
        self.flow.to(self.device)
        if cfg.channels_last and self.device.type == "cpu":
            self.extractor.to(memory_format=torch.channels_last)
            self.flow.to(memory_format=torch.channels_last)

    def _set_threads(self) -> None:
        threads = self.run_config.common.threads
        if threads > 0:
            torch.set_num_threads(threads)

    def _layout(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = [f.to(self.device, non_blocking=True) for f in feats]
        if self.norm is not None:
            feats = [(f - m) / s for f, (m, s) in zip(feats, self.norm, strict=True)]
        if self.config.channels_last and self.device.type == "cpu":
            feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
        return feats

    # ------------------------------------------------------------------ training

    def fit(self, images: torch.Tensor, context: TrainContext) -> dict[str, Any]:
        cfg = self.config
        common = self.run_config.common
        cfg.check_resources()  # fail with the one-line message before any work
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"fit expects uint8 images (N, 3, S, S), got {tuple(images.shape)} {images.dtype}")
        if len(images) == 0:
            raise TrainingError("no training images; add good images to the training folder")
        self._set_threads()
        torch.manual_seed(common.seed)
        self._build(pretrained=True)
        assert self.extractor is not None and self.flow is not None
        n = len(images)
        bs = min(common.batch_size, n)

        t0 = time.monotonic()

        def feature_progress(done: int, total: int) -> None:
            context.report(TrainProgress(phase="features", step=done, total=total))

        store = FeatureStore(
            self.extractor, images, cfg.feature_cache, bs, self.device, cfg.cache_dir, feature_progress
        )
        feature_s = time.monotonic() - t0
        self.norm = channel_statistics(store, n, bs, self.device) if cfg.feature_norm == "channel" else None
        try:
            summary = self._train(store, n, bs, context)
        finally:
            store.close()
        first_epoch_s = summary.pop("first_epoch_seconds")
        summary.update(
            backbone=cfg.backbone,
            feature_stage=cfg.feature_stage,
            feature_seconds=round(feature_s, 2),
            feature_cache=cfg.feature_cache,
            # the first epoch pays for feature extraction, later ones only touch the flow
            images_per_s_first_epoch=round(n / (feature_s + first_epoch_s), 2) if first_epoch_s else None,
        )
        return summary

    def _train(self, store: FeatureStore, n: int, bs: int, context: TrainContext) -> dict[str, Any]:
        cfg = self.config
        flow = self.flow
        assert flow is not None
        optimizer = torch.optim.Adam(
            flow.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        gen = torch.Generator().manual_seed(self.run_config.common.seed)
        steps_per_epoch = math.ceil(n / bs)
        epoch, batch_in_epoch, step = 0, 0, 0
        perm = torch.randperm(n, generator=gen)
        total_epochs = cfg.epochs
        state = context.resume_state
        if state:
            flow.load_state_dict(state["flow"])
            optimizer.load_state_dict(state["optimizer"])
            epoch, batch_in_epoch, step = int(state["epoch"]), int(state["batch_in_epoch"]), int(state["step"])
            total_epochs = int(state.get("total_epochs", total_epochs))
            perm = state["perm"]
            gen.set_state(state["rng"])

        def state_fn() -> dict[str, Any]:
            return {
                "flow": flow.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "step": step,
                "total_epochs": total_epochs,
                "perm": perm,
                "rng": gen.get_state(),
            }

        flow.train()
        train_t0 = time.monotonic()
        epoch_times: list[float] = []
        loss_value = float("nan")
        images_seen = 0
        while epoch < total_epochs:
            epoch_t0 = time.monotonic()
            epoch_loss, epoch_batches = 0.0, 0
            while batch_in_epoch < steps_per_epoch:
                idx = perm[batch_in_epoch * bs : (batch_in_epoch + 1) * bs]
                feats = self._layout(store.get(idx))
                zs, logdet = flow(feats)
                loss = nll_per_dim(zs, logdet)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"CS-Flow loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; lower csflow.lr "
                        f"(now {cfg.lr}) or csflow.clamp (now {cfg.clamp}), or check the training images"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(flow.parameters(), cfg.grad_clip)
                optimizer.step()
                loss_value = loss.item()
                epoch_loss += loss_value
                epoch_batches += 1
                images_seen += len(idx)
                batch_in_epoch += 1
                step += 1
                context.report(
                    TrainProgress(
                        phase="train",
                        step=step,
                        total=total_epochs * steps_per_epoch,
                        loss=loss_value,
                        info={"epoch": epoch + 1, "epochs": total_epochs},
                    ),
                    state_fn,
                )
            epoch += 1
            batch_in_epoch = 0
            perm = torch.randperm(n, generator=gen)
            epoch_times.append(time.monotonic() - epoch_t0)
            if context.time_budget_s > 0 and epoch < total_epochs:
                # Later epochs only touch the flow; the last epoch's time predicts the next ones.
                remaining = context.time_budget_s - context.elapsed_s()
                fit = epoch + max(0, int(remaining // max(epoch_times[-1], 1e-6)))
                total_epochs = max(epoch, min(total_epochs, fit))
        flow.eval()
        train_s = time.monotonic() - train_t0
        later = epoch_times[1:]
        return {
            "seconds": round(context.elapsed_s(), 2),
            "epochs": epoch,
            "epochs_configured": cfg.epochs,
            "steps": step,
            "final_loss": loss_value,
            "train_seconds": round(train_s, 2),
            "train_images_per_s": round(images_seen / train_s, 2) if train_s > 0 else None,
            "first_epoch_seconds": epoch_times[0] if epoch_times else None,
            "images_per_s_later_epochs": round(n / (sum(later) / len(later)), 2) if later else None,
        }

    # ------------------------------------------------------------------ inference

    @torch.inference_mode()
    def latents(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Latent maps ``z`` per scale for images ``(B, 3, S, S)`` in [0, 1]."""
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
        return self.prediction_from_latents(self.latents(images), images.shape[-1])

    @torch.inference_mode()
    def prediction_from_latents(self, zs: list[torch.Tensor], size: int) -> Prediction:
        """Image scores (mean z^2/2 over positions, channels, scales) and ``size x size`` maps."""
        energy = [z.float().pow(2).mul_(0.5) for z in zs]
        total = sum(e.sum(dim=(1, 2, 3)) for e in energy)
        count = sum(e[0].numel() for e in energy)
        scores = total / count
        per_scale = [e.mean(dim=1, keepdim=True) for e in energy]
        if self.config.map_mode == "largest":
            maps = F.interpolate(per_scale[0], size=(size, size), mode="bilinear", align_corners=False)
        else:
            # Geometric mean over scales: ranks pixels like the product (anomalib's "all" mode) but
            # stays in the units of z^2/2, like the image score.
            logs = [
                F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False).clamp_min(1e-12).log()
                for m in per_scale
            ]
            maps = torch.stack(logs).mean(0).exp()
        maps = gaussian_blur(maps[:, 0].contiguous(), self.config.map_sigma)
        return Prediction(scores=scores.float().cpu(), maps=maps.float().cpu().contiguous())

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flow and (truncated) backbone weights, so a saved model scores without the weights file."""
        if self.extractor is None or self.flow is None:
            raise RuntimeError("CSFlowDetector: nothing to save before fit()")
        out: dict[str, torch.Tensor] = {}
        for prefix, module in (("flow.", self.flow), ("backbone.", self.extractor.trunk)):
            for key, value in module.state_dict().items():
                out[prefix + key] = value.detach().cpu().contiguous().clone()
        for i, (mean, std) in enumerate(self.norm or []):
            out[f"norm.mean.{i}"] = mean.detach().cpu().contiguous().clone()
            out[f"norm.std.{i}"] = std.detach().cpu().contiguous().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._set_threads()
        self._build(pretrained=False)
        assert self.extractor is not None and self.flow is not None
        self.norm = None
        if self.config.feature_norm == "channel":
            try:
                self.norm = [
                    (state[f"norm.mean.{i}"].to(self.device), state[f"norm.std.{i}"].to(self.device))
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
