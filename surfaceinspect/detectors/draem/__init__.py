"""DRAEM (Zavrtanik et al., ICCV 2021): discriminatively trained reconstruction embedding."""

from typing import Any

from surfaceinspect.detectors.draem.config import DraemConfig

# Read by the registry (``detectors.get_config_class``) without importing the detector and so torch:
# a scoring install without torch checks an exported model's configuration with it.
CONFIG_CLASS = DraemConfig


def __getattr__(name: str) -> Any:
    if name == "DraemDetector":
        from surfaceinspect.detectors.draem.detector import DraemDetector

        return DraemDetector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CONFIG_CLASS", "DraemConfig", "DraemDetector"]
