"""Registry of detectors: method name -> ``Detector`` subclass (imported lazily)."""

from __future__ import annotations

import importlib

from surfaceinspect.detectors.base import Detector, Prediction, TrainContext, TrainProgress
from surfaceinspect.errors import ConfigError

# Adding a method: create surfaceinspect/detectors/<name>/ with a Detector subclass, add it here,
# and ship sample_configs/<name>-cpu.yaml and <name>-paper.yaml.
REGISTRY: dict[str, str] = {
    "draem": "surfaceinspect.detectors.draem:DraemDetector",
    "csflow": "surfaceinspect.detectors.csflow:CSFlowDetector",
}


def available_methods() -> list[str]:
    """Names accepted by ``--method``."""
    return sorted(REGISTRY)


def get_detector_class(method: str) -> type[Detector]:
    """The Detector subclass registered under ``method``."""
    if method not in REGISTRY:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(available_methods())}")
    module_name, class_name = REGISTRY[method].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


__all__ = [
    "REGISTRY",
    "Detector",
    "Prediction",
    "TrainContext",
    "TrainProgress",
    "available_methods",
    "get_detector_class",
]
