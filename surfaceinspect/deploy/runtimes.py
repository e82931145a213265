"""Runtimes that score with an exported model instead of the torch detector.

An export folder (written by ``surfaceinspect export``, see :mod:`surfaceinspect.deploy.export`) holds::

    model.onnx         the whole inference graph: image (B, 3, H, W) -> score (B,), map (B, H, W)
    calibration.json   the run's thresholds, copied at export time
    export.json        format version, input contract, output units, thresholds, the run's config

:class:`ExportedDetector` wraps such a graph as a :class:`~surfaceinspect.detectors.base.Scorer`,
so ``score``/``heatmap`` use the same engine path (batching, tiling, records, regions) for every
runtime; only ``predict_arrays`` differs. Nothing here imports torch: a scoring install without
torch (``surfaceinspect-runtime``) runs exported models through this module.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from surfaceinspect.config import run_config_from_dict
from surfaceinspect.detectors import get_config_class
from surfaceinspect.errors import ConfigError, ModelDirError

RUNTIMES = ("torch", "onnx", "openvino")
GRAPH_RUNTIMES = ("onnx", "openvino")  # runtimes that run the exported graph
EXPORT_FORMAT = "surfaceinspect-export"
EXPORT_FORMAT_VERSION = 1
MANIFEST_FILE = "export.json"
ONNX_FILE = "model.onnx"
DEFAULT_EXPORT_SUBDIR = "export-onnx"  # `export`'s default --out, inside the run folder
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "map")


def pip_install(requirement: str) -> str:
    """The command that installs ``requirement`` into the Python running this program (whatever venv is active)."""
    return f"`{shlex.quote(sys.executable)} -m pip install {requirement}`"


INSTALL_HINT = f"install it with {pip_install('onnxruntime')} (or `make install`)"


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a one-line error saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelDirError(
            f"exported models need the onnxruntime package, which is not installed; {INSTALL_HINT}"
        ) from None
    return onnxruntime


def import_openvino() -> Any:
    """The ``openvino`` module, or a one-line error saying how to install it (an optional extra)."""
    try:
        import openvino
    except ImportError:
        raise ModelDirError(
            "--runtime openvino needs the openvino package, which is not installed; install it with "
            f"{pip_install(repr('openvino>=2025.0'))} (or `pip install -e '.[openvino]'` in a checkout; not "
            "officially supported on AMD CPUs)"
        ) from None
    return openvino


def is_export_dir(path: Path) -> bool:
    """True if ``path`` is a folder written by ``surfaceinspect export``."""
    return (path / MANIFEST_FILE).is_file()


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """Parse and check ``export.json``: refuses another format or format version with one line."""
    path = export_dir / MANIFEST_FILE
    if not path.is_file():
        raise ModelDirError(
            f"{export_dir} holds no {MANIFEST_FILE}: not an export folder; write one with "
            "`surfaceinspect export --model RUN --format onnx`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep for the parser
        raise ModelDirError(f"{path} is corrupt (not valid JSON); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ModelDirError(f"{path} is not a surfaceinspect export manifest; export the model again")
    version = manifest.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise ModelDirError(
            f"{export_dir} is export format {version}, this surfaceinspect reads export format "
            f"{EXPORT_FORMAT_VERSION}; export the model again with this version (`surfaceinspect export`)"
        )
    return manifest


def model_file(export_dir: Path, manifest: dict[str, Any]) -> Path:
    """The graph file ``export.json`` names: a plain file name inside the export folder, nothing else.

    A manifest naming ``../../etc/passwd``, an absolute path, or a link leading out of the folder is
    refused: an export folder is self-contained, and the tool reads no file a manifest points it at.
    """
    name = manifest.get("model_file", ONNX_FILE)
    path = export_dir / name if isinstance(name, str) and name not in ("", ".", "..") else None
    if path is None or Path(name).name != name or path.resolve().parent != export_dir.resolve():
        raise ModelDirError(
            f"{export_dir / MANIFEST_FILE} names the model file {name!r}, which is not a file of the export folder; "
            "export the model again"
        )
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def onnx_session(model: bytes, threads: int = 0) -> Any:
    """An onnxruntime CPU session for a serialised model; ``threads`` 0 = onnxruntime's default."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are noise to an operator
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


GraphRunner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def graph_runner(model: bytes, runtime: str = "onnx", threads: int = 0) -> GraphRunner:
    """A function images ``(B, 3, H, W)`` float32 -> (scores, maps) running the ONNX graph in ``runtime``."""
    if runtime == "onnx":
        session = onnx_session(model, threads)
        return lambda images: tuple(session.run(list(OUTPUT_NAMES), {INPUT_NAME: images}))  # type: ignore[return-value]
    if runtime == "openvino":
        ov = import_openvino()
        core = ov.Core()
        # f32 explicitly: OpenVINO may otherwise pick bf16/f16 kernels, which would break parity.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(core.read_model(model), "CPU", config)
        outputs = [compiled.output(name) for name in OUTPUT_NAMES]

        def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            result = compiled(images)
            return result[outputs[0]], result[outputs[1]]

        return run
    raise ConfigError(f"no graph runtime {runtime}; choose one of: {', '.join(GRAPH_RUNTIMES)}")


class ExportedDetector:
    """A :class:`~surfaceinspect.detectors.scorer.Scorer` whose ``predict_arrays`` runs an exported ONNX graph.

    ``name``, ``run_config`` and ``input_size`` are those of the run it was exported from, so the
    engine batches, tiles, calibrates and writes records exactly as for the torch detector. It only
    scores: there is nothing to train and its weights live in the graph.
    """

    def __init__(self, export_dir: Path, threads: int = 0, runtime: str = "onnx") -> None:
        manifest = read_manifest(export_dir)
        try:
            method = str(manifest["method"])
            config_cls = get_config_class(method)
            run_config = run_config_from_dict(config_cls, manifest["config"])
        except (ConfigError, KeyError, TypeError, AttributeError, ValueError, RecursionError) as exc:
            raise ModelDirError(f"{export_dir / MANIFEST_FILE} has an invalid config ({exc}); export again") from None
        self.run_config = run_config
        self.name: str = method  # the method the graph computes, for messages and records
        self.export_dir = export_dir  # named on the model line: [onnx: FOLDER]
        self.manifest = manifest
        model_path = model_file(export_dir, manifest)
        if not model_path.is_file():
            raise ModelDirError(f"{model_path} is missing; the export folder is incomplete, export again")
        data = model_path.read_bytes()
        if sha256_bytes(data) != manifest.get("model_sha256"):
            raise ModelDirError(
                f"{model_path} does not match the checksum in {MANIFEST_FILE}: the file was modified or damaged; "
                "export the model again"
            )
        parity = manifest.get("parity_other", {}).get(runtime, {})
        if runtime != "onnx" and not parity.get("passed"):
            why = (
                "it scored unlike the torch model at export time "
                f"(max |score diff| {parity['max_abs_score_diff']:.3g}, tolerance {parity['score_tolerance']:.3g})"
                if "max_abs_score_diff" in parity
                else parity.get("reason", f"{runtime} was not installed at export time")
            )
            raise ModelDirError(
                f"{export_dir} cannot run with {runtime}: {why}; use --runtime onnx "
                f"(or export again once {runtime} passes the parity check)"
            )
        self.runtime = runtime
        self.run_graph = graph_runner(data, runtime, threads)

    @property
    def input_size(self) -> tuple[int, int]:
        """The network input ``(H, W)`` of the run it was exported from."""
        return self.run_config.common.input_hw()

    def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on ``(B, 3, H, W)`` float32 in [0, 1]: scores ``(B,)`` and maps ``(B, H, W)``, float32."""
        h, w = self.input_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, h, w):
            raise ValueError(f"the exported model expects images (B, 3, {h}, {w}), got {tuple(images.shape)}")
        scores, maps = self.run_graph(np.ascontiguousarray(images, dtype=np.float32))
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32)


def auto_runtime(model_dir: Path, on_cpu: bool, inference_sets: Sequence[str] = ()) -> str:
    """What ``--runtime auto`` runs: ``onnx`` where it was measured faster and is safe to use, else ``torch``.

    ONNX Runtime scored 2-3x faster than torch eager on the CPU (BENCHMARKS.md, section 10), so a run
    scored on the CPU uses its export when it has one that was made from its current weights (an export
    is only written after its parity check passed) and onnxruntime is installed. Inference overrides
    (``--set``) and GPUs keep torch; an export folder passed as the model is always a graph.
    """
    if is_export_dir(model_dir):
        return "onnx"
    export_dir = model_dir / DEFAULT_EXPORT_SUBDIR
    if inference_sets or not on_cpu or not is_export_dir(export_dir):
        return "torch"
    from surfaceinspect.storage import modeldir

    try:
        manifest = read_manifest(export_dir)
        import_onnxruntime()
        metadata = modeldir.read_metadata(model_dir)
    except ModelDirError:
        return "torch"
    if manifest.get("source_weights_sha256") != metadata.get("weights_sha256"):
        return "torch"  # exported before the weights changed: torch scores what the run holds now
    return "onnx"


def load_exported(
    model_dir: Path, runtime: str | None, threads: int = 0, inference_sets: Sequence[str] = ()
) -> tuple[ExportedDetector, dict[str, Any]]:
    """``--model`` with ``--runtime onnx``: an export folder itself, or a run folder with its default export.

    Returns the detector and the metadata its calibration is checked against (``method``,
    ``weights_sha256``, ``manifest``, ``training``). A run folder's own (possibly recalibrated)
    ``calibration.json`` applies, and its export must come from the run's current weights; an export
    folder uses the calibration copied into it, made for the weights it was exported from.
    """
    from surfaceinspect.storage import modeldir  # modeldir imports torch-heavy detector code; runtimes stays light

    if runtime not in (None, *RUNTIMES):
        raise ConfigError(f"--runtime {runtime} is unknown; choose one of: auto, {', '.join(RUNTIMES)}")
    if inference_sets:
        raise ConfigError("--set of inference settings needs the torch runtime: the exported graph is fixed")
    graph = runtime or "onnx"
    if is_export_dir(model_dir):
        if runtime == "torch":
            raise ConfigError(
                f"{model_dir} is an exported model: it runs with --runtime onnx or openvino; for torch pass "
                "the run folder it was exported from"
            )
        detector = ExportedDetector(model_dir, threads, graph)
        manifest = detector.manifest
        return detector, {
            "method": detector.name,
            "weights_sha256": manifest.get("source_weights_sha256"),
            "manifest": manifest.get("manifest"),
            "training": manifest.get("training", {}),
        }
    metadata = modeldir.read_metadata(model_dir)
    export_dir = model_dir / DEFAULT_EXPORT_SUBDIR
    if not is_export_dir(export_dir):
        raise ModelDirError(
            f"{model_dir} has no ONNX export ({export_dir.name}/ is missing); write it with "
            f"`surfaceinspect export --model {model_dir}`, or pass --model EXPORT_FOLDER"
        )
    detector = ExportedDetector(export_dir, threads, graph)
    if detector.manifest.get("source_weights_sha256") != metadata.get("weights_sha256"):
        raise ModelDirError(
            f"{export_dir} was exported from other weights than {model_dir} holds now; export again with "
            f"`surfaceinspect export --model {model_dir} --force`"
        )
    return detector, metadata
