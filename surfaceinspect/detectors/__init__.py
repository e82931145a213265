"""Registry of detectors: method name -> ``Detector`` subclass (imported lazily).

Importing this package does not import torch (the CLI builds its help from the registry); the
``Detector`` interface names are loaded from :mod:`.base` on first use.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from surfaceinspect.errors import ConfigError

if TYPE_CHECKING:
    from surfaceinspect.config import MethodConfig
    from surfaceinspect.detectors.base import Detector, Prediction, TrainContext, TrainingPaused, TrainProgress
    from surfaceinspect.detectors.scorer import Scorer

_BASE_NAMES = frozenset({"Detector", "Prediction", "Scorer", "TrainContext", "TrainProgress", "TrainingPaused"})

# Adding a method: create surfaceinspect/detectors/<name>/ with a Detector subclass (its config,
# its profiles' notes, its data-parallel variant if any: see base.Detector), add it here, and ship
# sample_configs/<name>-cpu.yaml and <name>-paper.yaml. This is the only line outside its package.
REGISTRY: dict[str, str] = {
    "draem": "surfaceinspect.detectors.draem:DraemDetector",
    "csflow": "surfaceinspect.detectors.csflow:CSFlowDetector",
}


# Methods from outside this package, without editing it: "name=module:Class,name2=module2:Class2"
# (the module importable, its profiles in a folder of SURFACEINSPECT_PROFILES). An environment
# variable, so that every process of a command (benchmark's workers, torchrun's ranks) sees them.
PLUGINS_ENV = "SURFACEINSPECT_METHODS"


def registry() -> dict[str, str]:
    """Every method: the built-in :data:`REGISTRY` and the plug-ins named in ``$SURFACEINSPECT_METHODS``."""
    found = dict(REGISTRY)
    for entry in filter(None, (e.strip() for e in os.environ.get(PLUGINS_ENV, "").split(","))):
        name, sep, target = entry.partition("=")
        if not sep or ":" not in target:
            raise ConfigError(f"${PLUGINS_ENV}: {entry!r} is not NAME=MODULE:CLASS")
        found.setdefault(name.strip(), target.strip())
    return found


def available_methods() -> list[str]:
    """Names accepted by ``--method``."""
    return sorted(registry())


def get_detector_class(method: str, *, data_parallel: bool = False) -> type[Detector]:
    """The Detector subclass registered under ``method`` (its ``data_parallel`` variant if asked)."""
    methods = registry()
    if method not in methods:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(available_methods())}")
    cls: type[Detector] = _load(methods[method])
    if data_parallel:
        if cls.data_parallel is None:
            raise ConfigError(f"{method} training under torchrun is not supported; train it in one process")
        cls = _load(cls.data_parallel)
    return cls


def _load(target: str) -> Any:
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_config_class(method: str) -> type[MethodConfig]:
    """The MethodConfig subclass of ``method``.

    A method's module may name it as ``CONFIG_CLASS`` (the built-in ones do), so that reading a
    configuration (an exported model's, in a scoring install without torch) does not import the
    detector; otherwise it is the detector class's ``config_cls``.
    """
    methods = registry()
    if method not in methods:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(available_methods())}")
    config_cls = getattr(importlib.import_module(methods[method].split(":")[0]), "CONFIG_CLASS", None)
    return config_cls if config_cls is not None else get_detector_class(method).config_cls


def __getattr__(name: str) -> Any:
    if name == "Scorer":  # torch-free: scoring an exported model imports no torch
        from surfaceinspect.detectors.scorer import Scorer

        return Scorer
    if name in _BASE_NAMES:
        from surfaceinspect.detectors import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PLUGINS_ENV",
    "REGISTRY",
    "Detector",
    "Prediction",
    "Scorer",
    "TrainContext",
    "TrainProgress",
    "TrainingPaused",
    "available_methods",
    "get_config_class",
    "get_detector_class",
    "registry",
]
