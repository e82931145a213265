"""What scores mean: metrics, threshold calibration, defect regions, drift, overlays and plots."""
