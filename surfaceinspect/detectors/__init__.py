"""Registry of detectors: method name -> ``Detector`` subclass (imported lazily).

Importing this package does not import torch (the CLI builds its help from the registry); the
``Detector`` interface names are loaded from :mod:`.base` on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from surfaceinspect.errors import ConfigError

if TYPE_CHECKING:
    from surfaceinspect.config import MethodConfig
    from surfaceinspect.detectors.base import Detector, Prediction, TrainContext, TrainingPaused, TrainProgress

_BASE_NAMES = frozenset({"Detector", "Prediction", "TrainContext", "TrainProgress", "TrainingPaused"})

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


def get_config_class(method: str) -> type[MethodConfig]:
    """The MethodConfig subclass of ``method`` (imports the method's package)."""
    return get_detector_class(method).config_cls


def __getattr__(name: str) -> Any:
    if name in _BASE_NAMES:
        from surfaceinspect.detectors import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REGISTRY",
    "Detector",
    "Prediction",
    "TrainContext",
    "TrainProgress",
    "TrainingPaused",
    "available_methods",
    "get_config_class",
    "get_detector_class",
]
