"""surfaceinspect: surface defect detection for factory inspection (DRAEM and CS-Flow)."""

import cv2 as _cv2

# OpenCV's thread pool does not survive fork(): a DataLoader worker that touches cv2 after the
# parent process used it can deadlock (seen in `demo`: DRAEM's workers hung in cv2.setNumThreads).
# Parallelism comes from torch and from worker processes instead, so keep OpenCV single-threaded
# from the start, before any cv2 call can create the pool.
_cv2.setNumThreads(1)

__version__ = "0.1.0"
