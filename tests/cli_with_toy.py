"""Run the real CLI with the toy detector registered (for tests that need a separate process to kill)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from surfaceinspect import config
from surfaceinspect.cli import main
from surfaceinspect.detectors import REGISTRY

REGISTRY["toy"] = "toy_detector:ToyDetector"
config.PROFILE_DIRS = (Path(os.environ["TOY_PROFILES"]), *config.PROFILE_DIRS)
main()
