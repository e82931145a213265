"""Device selection and CPU thread settings.

torch is imported where a function needs it, not here: a scoring install without torch asks
:func:`available_cores` too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING

from surfaceinspect.errors import ConfigError

if TYPE_CHECKING:
    import torch


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def torch_installed() -> bool:
    """Whether torch can be imported here (a scoring install without torch has only exported models)."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # ValueError: a None in sys.modules (how a test hides torch)
        return False


# Device files a CUDA (NVIDIA) or ROCm (AMD) GPU driver creates on Linux: where none exists, torch
# cannot see a GPU, so ``--device auto`` need not import torch (2 s and 500 MB) to learn that.
_GPU_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd")


def gpu_possible() -> bool:
    """False only where no GPU can be used for certain (Linux without a GPU driver); True otherwise."""
    if not sys.platform.startswith("linux"):
        return True  # no cheap certainty elsewhere: ask torch
    return any(os.path.exists(path) for path in _GPU_DRIVER_FILES)


def scores_on_cpu(name: str) -> bool:
    """Whether ``--device name`` means the CPU, asking torch only where a GPU could answer otherwise:
    without torch, or (``auto``) without a GPU driver, nothing scores on a GPU."""
    if name == "cpu" or not torch_installed() or (name == "auto" and not gpu_possible()):
        return True
    return resolve_device(name).type == "cpu"


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")


def configure_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = one per available core); returns the number used.

    Inter-op parallelism is kept at 1: the networks here are single graphs where extra inter-op
    threads only compete with DataLoader workers for the same cores.
    """
    import torch

    n = threads or available_cores()
    torch.set_num_threads(n)
    # Can only be set once per process, before any parallel work started.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return n
