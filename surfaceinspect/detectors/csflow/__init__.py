"""CS-Flow: fully convolutional cross-scale normalizing flows (Rudolph et al., WACV 2022)."""

from typing import Any

from .config import CSFlowConfig

# Read by the registry (``detectors.get_config_class``) without importing the detector and so torch:
# a scoring install without torch checks an exported model's configuration with it.
CONFIG_CLASS = CSFlowConfig


def __getattr__(name: str) -> Any:
    if name == "CSFlowDetector":
        from .detector import CSFlowDetector

        return CSFlowDetector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CONFIG_CLASS", "CSFlowConfig", "CSFlowDetector"]
