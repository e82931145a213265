"""surfaceinspect: surface defect detection for factory inspection (DRAEM and CS-Flow)."""

__version__ = "0.1.0"
