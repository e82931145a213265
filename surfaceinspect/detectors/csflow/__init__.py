"""CS-Flow: fully convolutional cross-scale normalizing flows (Rudolph et al., WACV 2022)."""

from .config import CSFlowConfig
from .detector import CSFlowDetector

__all__ = ["CSFlowConfig", "CSFlowDetector"]
