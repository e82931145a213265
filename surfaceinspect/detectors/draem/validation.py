"""Early stopping for DRAEM on a held-out *synthetic* validation set.

Longer training can overfit the synthetic anomalies (the discriminative network learns cues of the
synthesis rather than "not normal"). Good images held out from training, each with a few fixed
synthetic anomalies, measure how well the network segments anomalies on images it has not seen;
training stops when that stops improving and the best weights are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from surfaceinspect.analysis.metrics import average_precision
from surfaceinspect.detectors.draem.sources import AnomalySource
from surfaceinspect.detectors.draem.synthesis import SynthesisParams, synthesize


def split_validation(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of ``n`` images with ``n_val`` held out, from the seed alone."""
    perm = np.random.default_rng([seed, 5]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class SyntheticValidationSet:
    """Held-out good images, each as itself and with ``variants`` fixed synthetic anomalies.

    The clean copies make false alarms on normal images count too; every anomalous sample is drawn
    from its own seed, so the set is the same at every evaluation and on resume.
    """

    def __init__(
        self,
        images: np.ndarray,
        source: AnomalySource,
        params: SynthesisParams,
        seed: int,
        variants: int = 3,
    ) -> None:
        forced = replace(params, anomaly_prob=1.0)  # the good images' rotation lives in SynthesisDataset, not here
        inputs, masks = [], []
        for i, img in enumerate(images):
            image = img.astype(np.float32) / 255.0
            inputs.append(image)
            masks.append(np.zeros(image.shape[:2], dtype=np.float32))
            for k in range(variants):
                augmented, mask = synthesize(image, source, forced, np.random.default_rng([seed, 4, i, k]))
                inputs.append(augmented)
                masks.append(mask)
        self.inputs = torch.from_numpy(np.ascontiguousarray(np.stack(inputs).transpose(0, 3, 1, 2)))
        self.masks = np.stack(masks) > 0.5

    def __len__(self) -> int:
        return len(self.inputs)

    @torch.no_grad()
    def pixel_ap(self, model: torch.nn.Module, device: torch.device, batch_size: int = 16) -> float:
        """Pixel average precision of the discriminator's anomaly probability (model in eval mode)."""
        probs = []
        for start in range(0, len(self.inputs), batch_size):
            x = self.inputs[start : start + batch_size].to(device)
            _, logits = model(x)
            probs.append(F.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
        return average_precision(self.masks.ravel(), np.concatenate(probs).ravel())


@dataclass
class EarlyStopping:
    """Best-so-far tracking with patience, counted in evaluations."""

    patience: int
    best_score: float = -1.0
    best_step: int = 0
    bad_evaluations: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None

    def update(self, step: int, score: float, model: torch.nn.Module) -> None:
        """Record the score after ``step`` steps; keep a CPU copy of the weights when it is the best."""
        self.history.append((step, round(score, 5)))
        if score > self.best_score:
            self.best_score, self.best_step, self.bad_evaluations = score, step, 0
            self.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_evaluations += 1

    @property
    def should_stop(self) -> bool:
        return self.bad_evaluations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_step": self.best_step,
            "bad_evaluations": self.bad_evaluations,
            "history": [list(h) for h in self.history],
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score = float(state["best_score"])
        self.best_step = int(state["best_step"])
        self.bad_evaluations = int(state["bad_evaluations"])
        self.history = [(int(s), float(v)) for s, v in state["history"]]
        self.best_weights = state["best_weights"]
