"""What scoring needs of a model, without torch: the :class:`Scorer` protocol.

A trained :class:`~surfaceinspect.detectors.base.Detector` (torch) and an exported graph
(:class:`~surfaceinspect.deploy.runtimes.ExportedDetector`, ONNX Runtime) both implement it, so
``score``, ``heatmap``, ``watch`` and ``serve`` run the same engine for every runtime, and a
scoring install without torch imports nothing of torch on the way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from surfaceinspect.config import RunConfig


@runtime_checkable
class Scorer(Protocol):
    """What scoring, calibration and heatmaps need of a model: a :class:`Detector` and an exported graph
    (:class:`~surfaceinspect.deploy.runtimes.ExportedDetector`) alike."""

    name: str  # the method, for messages and records
    run_config: RunConfig  # input geometry, batching, tiling, regions: scored exactly as trained

    @property
    def input_size(self) -> tuple[int, int]:
        """The network input ``(H, W)``."""
        ...

    def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score a batch ``(B, 3, H, W)`` float32 in [0, 1]: float32 scores ``(B,)`` and maps ``(B, H, W)``."""
        ...
