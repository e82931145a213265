"""The model directory that ``train`` writes and ``score``/``heatmap`` read.

Layout of one run directory::

    model.safetensors   weights (safetensors: loading cannot execute code)
    metadata.json       format version, method, effective config, versions, training summary,
                        dataset fingerprint, SHA-256 of the weights
    calibration.json    thresholds and score normalisation (rewritten by ``recalibrate``), bound to
                        the weights it was made for
    SHA256SUMS          SHA-256 of every file that affects a verdict (weights, metadata,
                        calibration, ``export-onnx/``), in ``sha256sum`` format; checked on load
    calibration.<UTC time>.json
                        earlier calibrations, kept by ``recalibrate`` (``recalibrate --undo`` restores
                        the newest)
    checkpoint.pt       resumable training state while training runs (torch.load weights_only=True);
                        removed when training completes

Run directories live under the runs folder (``$SURFACEINSPECT_HOME/runs``, default
``~/.local/share/surfaceinspect/runs``); the file ``LATEST`` there names the newest finished run
(by name for a run in the runs folder, by absolute path for one written elsewhere with ``--out``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import platform
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import surfaceinspect
from surfaceinspect.config import run_config_from_dict, with_inference_overrides
from surfaceinspect.detectors import get_detector_class
from surfaceinspect.errors import ConfigError, ModelDirError
from surfaceinspect.storage.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    import torch

    from surfaceinspect.detectors import Detector

# torch and safetensors are imported by the functions that save or load weights and checkpoints,
# not here: a scoring install without torch reads metadata, calibration and SHA256SUMS through this module.

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
CALIBRATION_FILE = "calibration.json"
CHECKPOINT_FILE = "checkpoint.pt"
LATEST_FILE = "LATEST"
AUTO_STATE_FILE = "auto.json"  # an unfinished `train --method auto` (see surfaceinspect.workflows.auto)
CANDIDATES_DIR = "candidates"  # its candidates' probe checkpoints and evidence
SELECTION_SCORES_FILE = "selection_scores.json"  # a finished auto run: every candidate's raw evidence scores
# The manifest: one "<sha256>  <path>" line per file that affects a verdict, sorted by path.
SUMS_FILE = "SHA256SUMS"
EXPORT_SUBDIR = "export-onnx"  # = runtimes.DEFAULT_EXPORT_SUBDIR (runtimes imports this module lazily)
EXPORT_FILES = ("model.onnx", "export.json", CALIBRATION_FILE)  # the verdict files of an export folder
RUN_FILES = (
    WEIGHTS_FILE,
    METADATA_FILE,
    CALIBRATION_FILE,
    SELECTION_SCORES_FILE,
    *(f"{EXPORT_SUBDIR}/{n}" for n in EXPORT_FILES),
)
MODEL_ID_LENGTH = 12
_BACKUP_NAME = re.compile(r"^calibration\.(\d{8}T\d{6}Z)(?:\.(\d+))?\.json$")


def runs_root() -> Path:
    """The default runs folder (``$SURFACEINSPECT_HOME/runs`` or the XDG data directory)."""
    home = os.environ.get("SURFACEINSPECT_HOME")
    if home:
        return Path(home).expanduser() / "runs"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "surfaceinspect" / "runs"


def new_run_dir(method: str, root: Path | None = None) -> Path:
    """Create and return a fresh ``<root>/<method>-<timestamp>`` directory."""
    root = root or runs_root()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        name = f"{method}-{stamp}" + (f"-{attempt}" if attempt else "")
        path = root / name
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise ModelDirError(f"could not create a run directory under {root}")


def mark_latest(run_dir: Path, root: Path | None = None) -> None:
    """Record ``run_dir`` as the newest finished run in ``root/LATEST`` (default: the runs folder).

    A run inside ``root`` is named by its folder name (as older versions wrote it), any other run
    by its absolute path, so ``LATEST`` always names the newest run wherever ``--out`` put it.
    """
    root = root or runs_root()
    run_dir = run_dir.expanduser().resolve()
    name = run_dir.name if run_dir.parent == root.expanduser().resolve() else str(run_dir)
    write_text_atomic(root / LATEST_FILE, name + "\n")


def latest_run(root: Path | None = None) -> Path:
    """The run named by ``LATEST``; a ModelDirError with the fix if there is none."""
    root = root or runs_root()
    marker = root / LATEST_FILE
    if not marker.is_file():
        raise ModelDirError(
            f"no trained model found under {root}; train one first "
            "(surfaceinspect train --method draem ./good_images) or pass --model RUN_DIR"
        )
    run_dir = root / marker.read_text(encoding="utf-8").strip()  # an absolute path stays as it is
    if not run_dir.is_dir():
        raise ModelDirError(f"{marker} names {run_dir}, which no longer exists; pass --model RUN_DIR or retrain")
    return run_dir


def resolve_model_dir(model: str | Path | None) -> Path:
    """``--model`` as given, or the latest finished run when it is omitted."""
    if model is None or str(model) == "latest":
        return latest_run()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist; pass a run directory written by `train`")
    return path


def refuse_existing_run(run_dir: Path, force: bool) -> None:
    """Refuse to train into a folder that holds a model or an interrupted run, unless ``force``."""
    if force:
        return
    if (run_dir / METADATA_FILE).is_file():
        raise ModelDirError(
            f"--out {run_dir} already holds a trained model; choose a new --out, or pass --force to replace it"
        )
    if (run_dir / CHECKPOINT_FILE).is_file() or (run_dir / AUTO_STATE_FILE).is_file():
        raise ModelDirError(
            f"--out {run_dir} holds an interrupted training run; continue it with "
            f"`surfaceinspect train --resume {run_dir}`, or pass --force to start over"
        )


def clear_model(run_dir: Path) -> list[Path]:
    """Delete the model files of ``run_dir`` (never other files); returns what was removed.

    ``metadata.json`` goes first, so an interruption leaves a folder that is no finished model.
    """
    names = [METADATA_FILE, WEIGHTS_FILE, CALIBRATION_FILE, CHECKPOINT_FILE, SUMS_FILE, AUTO_STATE_FILE]
    names.append(SELECTION_SCORES_FILE)
    # The run's own export is the old model's graph: kept, the new manifest would vouch for it.
    export_dir = run_dir / EXPORT_SUBDIR
    if export_dir.is_dir() and not export_dir.is_symlink():
        names += [f"{EXPORT_SUBDIR}/{n}" for n in (*EXPORT_FILES, SUMS_FILE)]
    removed = []
    for path in [run_dir / n for n in names] + calibration_backups(run_dir):
        if path.is_file():
            path.unlink()
            removed.append(path)
    candidates = run_dir / CANDIDATES_DIR
    if candidates.is_dir() and not candidates.is_symlink():
        shutil.rmtree(candidates)
        removed.append(candidates)
    return removed


# ---------------------------------------------------------------------------------------------
# Calibration backups (recalibrate keeps the calibration it replaces)


def _backup_key(path: Path) -> tuple[str, int]:
    match = _BACKUP_NAME.match(path.name)
    assert match is not None
    return match.group(1), int(match.group(2) or 0)


def calibration_backups(run_dir: Path) -> list[Path]:
    """The kept earlier calibrations of ``run_dir``, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _BACKUP_NAME.match(p.name) and p.is_file()]
    return sorted(found, key=_backup_key)


def backup_calibration(run_dir: Path) -> Path | None:
    """Copy ``calibration.json`` to ``calibration.<UTC time>.json``; returns the copy (None if there is none)."""
    current = run_dir / CALIBRATION_FILE
    if not current.is_file():
        return None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    backup = run_dir / f"calibration.{stamp}.json"
    counter = 0
    while backup.exists():
        counter += 1
        backup = run_dir / f"calibration.{stamp}.{counter}.json"
    write_bytes_atomic(backup, current.read_bytes())
    return backup


def newest_calibration_backup(run_dir: Path) -> Path:
    """The newest kept calibration of ``run_dir``; a ModelDirError if there is none."""
    backups = calibration_backups(run_dir)
    if not backups:
        raise ModelDirError(
            f"{run_dir} has no earlier calibration to restore (recalibrate keeps each one it replaces, "
            "as calibration.<time>.json)"
        )
    return backups[-1]


def restore_calibration(run_dir: Path, backup: Path) -> None:
    """Move ``backup`` (a kept calibration) back to ``calibration.json``, atomically."""
    os.replace(backup, run_dir / CALIBRATION_FILE)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The manifest (SHA256SUMS) and the model id
#
# Plain ``sha256sum`` format, so a model folder can be checked without surfaceinspect
# (``cd RUN && sha256sum -c SHA256SUMS``), sorted by path, so the same files always give the same
# text. The model id is the first 12 hex digits of the SHA-256 of that text: it changes whenever a
# file that affects a verdict changes (training, recalibrate, export), and an older folder without
# the file gets the same id it would have with it. It detects changes, it is not a signature: whoever
# can edit the files can edit the manifest too (but the model id then changes, in every record).

_SUMS_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


@dataclass
class ModelIdentity:
    """The outcome of the manifest check: the model id, and whether a manifest vouched for the files."""

    model_id: str
    sealed: bool  # SHA256SUMS was there and every verdict file matched it
    sums: dict[str, str]  # relative path -> SHA-256 of the verdict files present
    notes: list[str] = field(default_factory=list)


def verdict_files(model_dir: Path) -> tuple[str, ...]:
    """The files of ``model_dir`` that affect a verdict (an export folder has its own set)."""
    return EXPORT_FILES if (model_dir / "export.json").is_file() else RUN_FILES


def current_sums(model_dir: Path) -> dict[str, str]:
    """SHA-256 of the verdict files present in ``model_dir`` (read once, at load: never per image)."""
    return {name: sha256_file(model_dir / name) for name in verdict_files(model_dir) if (model_dir / name).is_file()}


def sums_text(sums: dict[str, str]) -> str:
    """The canonical manifest text: ``<sha256>  <path>`` lines sorted by path."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def model_id(sums: dict[str, str]) -> str:
    """The first 12 hex digits of the SHA-256 of the manifest text (``sha256sum SHA256SUMS | cut -c1-12``)."""
    return hashlib.sha256(sums_text(sums).encode("utf-8")).hexdigest()[:MODEL_ID_LENGTH]


def read_sums(model_dir: Path) -> dict[str, str] | None:
    """The manifest of ``model_dir`` (None if it has none); a ModelDirError if it is malformed."""
    path = model_dir / SUMS_FILE
    if not path.is_file():
        return None
    allowed = set(verdict_files(model_dir))
    sums: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        lines = ["?"]
    for number, line in enumerate(lines, 1):
        match = _SUMS_LINE.match(line)
        if match is None or match.group(2) not in allowed:  # never a path outside the model's own files
            raise ModelDirError(
                f"{path} line {number} is not a checksum of a model file; restore the file or retrain the model"
            )
        sums[match.group(2)] = match.group(1)
    return sums


def _compare_sums(model_dir: Path, stored: dict[str, str], present: dict[str, str], skip: set[str]) -> None:
    """Refuse, with one line, the first verdict file that differs from the manifest."""
    for name in sorted((set(stored) | set(present)) - skip):
        path = model_dir / name
        if name not in present:
            raise ModelDirError(f"{path} is missing (listed in {SUMS_FILE}); the model is incomplete: restore it")
        if name not in stored:
            fix = "export again with `surfaceinspect export --force`" if "export" in name else "remove it or retrain"
            raise ModelDirError(f"{path} was added after the model was written (not in {SUMS_FILE}); {fix}")
        if stored[name] != present[name]:
            fix = "run `surfaceinspect recalibrate`" if name == CALIBRATION_FILE else "retrain"
            raise ModelDirError(
                f"{path} was changed after the model was written (its SHA-256 differs from {SUMS_FILE}), so "
                f"verdicts would no longer be the model's; restore the file, or {fix}"
            )


def verify_sums(model_dir: Path, *, expected: bool, skip: Iterable[str] = ()) -> ModelIdentity:
    """Check every verdict file of ``model_dir`` against its manifest; returns the model id.

    ``expected``: the metadata says the folder was written with a manifest, so a missing one is an
    error; without it (a folder of an older version) the model id is computed and a note says that
    nothing vouches for the files. ``skip``: files not checked (``recalibrate`` replaces them).
    """
    stored = read_sums(model_dir)
    present = current_sums(model_dir)
    if stored is None:
        if expected:
            raise ModelDirError(
                f"{model_dir / SUMS_FILE} is missing, but the model was written with one: the folder is incomplete "
                "or was altered; restore it or retrain"
            )
        note = (
            f"{model_dir} has no {SUMS_FILE} (written by an older surfaceinspect): only its weights are checked; "
            "`surfaceinspect recalibrate` or `export` with this version adds one"
        )
        return ModelIdentity(model_id(present), False, present, [note])
    _compare_sums(model_dir, stored, present, set(skip))
    return ModelIdentity(model_id(present), True, present)


def write_sums(model_dir: Path, changed: Iterable[str] = ()) -> ModelIdentity:
    """Write the manifest of ``model_dir`` after the tool (re)wrote the files ``changed``.

    Every other verdict file must still match the manifest being replaced, so a rewrite never
    vouches for a file that was modified behind the tool's back (a folder without a manifest is
    taken as found: its weights were checked against the metadata when it was loaded).
    """
    stored = read_sums(model_dir)
    present = current_sums(model_dir)
    if stored is not None:
        _compare_sums(model_dir, stored, present, set(changed))
    write_text_atomic(model_dir / SUMS_FILE, sums_text(present))
    return ModelIdentity(model_id(present), True, present)


def dataset_fingerprint(root: Path, files: list[Path]) -> dict[str, Any]:
    """Identify a training set by its files' relative paths and sizes (cheap, order-independent)."""
    digest = hashlib.sha256()
    total = 0
    for path in sorted(files):
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = path.as_posix()
        size = path.stat().st_size if path.exists() else -1
        total += max(size, 0)
        digest.update(f"{rel}\0{size}\n".encode())
    return {"root": str(root), "n_files": len(files), "total_bytes": total, "sha256": digest.hexdigest()}


def environment_versions() -> dict[str, str]:
    import numpy
    import torch

    return {
        "surfaceinspect": surfaceinspect.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def save_model(
    run_dir: Path,
    detector: Detector,
    summary: dict[str, Any],
    fingerprint: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write weights and metadata of a trained detector to ``run_dir`` (both atomically); returns the metadata.

    The caller writes the calibration and then :func:`write_sums`; ``metadata["manifest"]`` says
    that this directory must have one (a directory without it is incomplete, not old).
    """
    from safetensors.torch import save as safetensors_save

    state = {k: v.detach().to("cpu").contiguous() for k, v in detector.state_dict().items()}
    data = safetensors_save(state, metadata={"format_version": str(FORMAT_VERSION), "method": detector.name})
    write_bytes_atomic(run_dir / WEIGHTS_FILE, data)
    metadata = {
        "format_version": FORMAT_VERSION,
        "method": detector.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": detector.run_config.to_dict(),
        "versions": environment_versions(),
        "training": summary,
        "dataset": fingerprint,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "manifest": SUMS_FILE,
        **(extra or {}),
    }
    write_json_atomic(run_dir / METADATA_FILE, metadata)
    return metadata


def read_metadata(run_dir: Path) -> dict[str, Any]:
    """Parse and check ``metadata.json`` of a run directory."""
    path = run_dir / METADATA_FILE
    if not path.is_file():
        hint = (
            " (training did not finish: resume it with `surfaceinspect train --resume " + str(run_dir) + "`)"
            if (run_dir / CHECKPOINT_FILE).is_file()
            else ""
        )
        raise ModelDirError(f"{run_dir} is not a finished model directory: {METADATA_FILE} is missing{hint}")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep for the parser
        raise ModelDirError(f"{path} is corrupt (not valid JSON); retrain or restore the file") from None
    if not isinstance(metadata, dict) or "format_version" not in metadata:
        raise ModelDirError(f"{path} is not a surfaceinspect metadata file")
    version = metadata["format_version"]
    if version != FORMAT_VERSION:
        raise ModelDirError(
            f"{run_dir} has model format {version}, this surfaceinspect {surfaceinspect.__version__} reads "
            f"format {FORMAT_VERSION}; retrain the model or use a matching surfaceinspect version"
        )
    return metadata


def load_model(
    run_dir: Path, device: torch.device, inference_sets: Sequence[str] = ()
) -> tuple[Detector, dict[str, Any]]:
    """Load a finished run directory; refuses incompatible, incomplete or modified directories.

    ``inference_sets`` (``section.key=value``) replace inference settings of the stored config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    metadata = read_metadata(run_dir)
    method = metadata.get("method")
    try:
        cls = get_detector_class(str(method))
        run_config = run_config_from_dict(cls.config_cls, metadata["config"])
    except (ConfigError, KeyError, TypeError, AttributeError, ValueError, RecursionError) as exc:
        raise ModelDirError(f"{run_dir / METADATA_FILE} has an invalid config ({exc}); retrain the model") from None
    run_config = with_inference_overrides(run_config, inference_sets)
    weights_path = run_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelDirError(f"{weights_path} is missing; the model directory is incomplete, retrain it")
    data = weights_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != metadata.get("weights_sha256"):
        raise ModelDirError(
            f"{weights_path} does not match the checksum in {METADATA_FILE}: the file was modified or damaged; "
            "restore it or retrain"
        )
    try:
        state = safetensors_load(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelDirError(f"{weights_path} cannot be read as safetensors ({exc}); retrain the model") from None
    detector = cls(run_config, device)
    try:
        detector.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        first = str(exc).splitlines()[0]
        raise ModelDirError(
            f"{weights_path} does not fit the {method} architecture in its metadata ({first})"
        ) from None
    return detector, metadata


# ---------------------------------------------------------------------------------------------
# Resumable training checkpoints


@dataclass
class TrainCheckpoint:
    """What ``train --resume`` needs: the run's config, data and the detector's training state."""

    run_config: dict[str, Any]
    data_dir: str
    train_files: list[str]
    calibration_files: list[str]
    detector_state: dict[str, Any]
    # Training seconds spent before this checkpoint, so a resumed run keeps its time budget.
    train_seconds: float = 0.0
    calibration_dir: str | None = None  # ``train --calibration-dir``: the labelled calibration folder


def save_checkpoint(run_dir: Path, checkpoint: TrainCheckpoint) -> None:
    """Write ``checkpoint.pt`` atomically (a kill during the write keeps the previous checkpoint)."""
    import torch

    buffer = io.BytesIO()
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "run_config": checkpoint.run_config,
            "data_dir": checkpoint.data_dir,
            "train_files": checkpoint.train_files,
            "calibration_files": checkpoint.calibration_files,
            "detector_state": checkpoint.detector_state,
            "train_seconds": checkpoint.train_seconds,
            "calibration_dir": checkpoint.calibration_dir,
        },
        buffer,
    )
    write_bytes_atomic(run_dir / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(run_dir: Path) -> TrainCheckpoint:
    """Read ``checkpoint.pt`` with ``weights_only=True``."""
    import torch

    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise ModelDirError(f"{path} does not exist; there is no interrupted training to resume in {run_dir}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelDirError(f"{path} cannot be loaded safely ({first}); start a new training run") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{path} is from an incompatible surfaceinspect version; start a new training run")
    return TrainCheckpoint(
        run_config=raw["run_config"],
        data_dir=raw["data_dir"],
        train_files=list(raw["train_files"]),
        calibration_files=list(raw["calibration_files"]),
        detector_state=raw["detector_state"],
        train_seconds=float(raw.get("train_seconds", 0.0)),
        calibration_dir=raw.get("calibration_dir"),
    )


def find_resumable(root: Path | None = None) -> Path:
    """The most recently updated run directory that holds an unfinished training checkpoint."""
    root = root or runs_root()
    markers = [*root.glob(f"*/{CHECKPOINT_FILE}"), *root.glob(f"*/{AUTO_STATE_FILE}")]
    candidates = [p for p in markers if not (p.parent / METADATA_FILE).exists()]
    if not candidates:
        raise ModelDirError(f"no interrupted training run under {root}; pass the run directory to --resume")
    return max(candidates, key=lambda p: p.stat().st_mtime).parent
