"""Typed errors and the exit codes the CLI maps them to.

Every error the user can cause carries a one-line message that names the file (if any)
and says how to fix it; the CLI prints that line and exits with the code below.
"""

from __future__ import annotations

from pathlib import Path

# Exit codes (documented in README and `--help`).
EXIT_OK = 0  # every image scored good
EXIT_DEFECT = 1  # at least one image scored defective
EXIT_USAGE = 2  # usage, input, config or model error: nothing (or not everything) could run
EXIT_UNREADABLE = 3  # some images could not be read, none of the readable ones is defective
EXIT_INTERNAL = 4  # a bug in surfaceinspect; rerun with --debug and report the traceback
EXIT_DRIFT = 5  # only with --fail-on-drift: the good scores drifted from calibration (verdicts in doubt)
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader (`score --json | head`): stopped, as a process SIGPIPE ends


class SurfaceInspectError(Exception):
    """Base class of every error the user can act on. ``str(err)`` is the one-line message."""

    exit_code: int = EXIT_USAGE


class ImageReadError(SurfaceInspectError):
    """An image file could not be read or decoded."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class DatasetError(SurfaceInspectError):
    """A folder or dataset layout is not usable (empty, missing masks, wrong layout)."""


class ConfigError(SurfaceInspectError):
    """A configuration value is invalid; the message says which key and how to fix it."""


class ModelDirError(SurfaceInspectError):
    """A model directory is missing, incompatible, incomplete or was modified."""


class BackboneWeightsError(SurfaceInspectError):
    """Pretrained weights for a backbone are not available offline."""


class OutputError(SurfaceInspectError):
    """An output path cannot be used: it would overwrite an input or a file the tool did not write,
    or it cannot be written (permissions, a file in the way, disk full)."""


class TrainingError(SurfaceInspectError):
    """Training cannot go on (e.g. non-finite loss); the message says what to change."""
