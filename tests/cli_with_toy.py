"""Run the real CLI with the toy detector registered (for tests that need a separate process to kill)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from surfaceinspect.cli import main
from surfaceinspect.config import PROFILES_ENV
from surfaceinspect.detectors import PLUGINS_ENV

os.environ[PLUGINS_ENV] = "toy=toy_detector:ToyDetector"
os.environ[PROFILES_ENV] = os.environ["TOY_PROFILES"]
main()
