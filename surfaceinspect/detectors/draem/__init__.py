"""DRAEM (Zavrtanik et al., ICCV 2021): discriminatively trained reconstruction embedding."""

from surfaceinspect.detectors.draem.config import DraemConfig
from surfaceinspect.detectors.draem.detector import DraemDetector

__all__ = ["DraemConfig", "DraemDetector"]
