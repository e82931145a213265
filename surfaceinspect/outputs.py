"""Where a command may write: one set of rules for every output path of every command.

No command writes over its inputs or over a file it did not create:

* An output **folder** may not be an input folder, nor contain one. It may lie inside an input
  folder only as a dedicated subfolder (new, empty, or an earlier output of the tool); every
  output folder is marked with :data:`~surfaceinspect.imageio.OUTPUT_MARKER`, and image discovery
  skips marked folders, so outputs are never read back as inputs.
* An existing, non-empty folder that the tool did not mark is refused unless ``--force``.
* An output **file** may never be an input image (not even with ``--force``). An existing file is
  replaced only when the tool wrote it (the caller recognises its own files by their content) or
  with ``--force``. Devices and pipes (``/dev/stdout``) are written as they are.
* A path that cannot be written (permissions, a file where a folder is needed, a read-only or
  full disk) is an :class:`~surfaceinspect.errors.OutputError` with a one-line fix, never a crash.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import surfaceinspect
from surfaceinspect.atomic import write_text_atomic
from surfaceinspect.errors import OutputError
from surfaceinspect.imageio import IMAGE_EXTENSIONS, OUTPUT_MARKER, is_output_dir

_OS_ERROR_FIXES = {
    errno.EACCES: "permission denied; choose a writable location or fix the permissions",
    errno.EPERM: "operation not permitted; choose a writable location or fix the permissions",
    errno.EROFS: "read-only file system; write somewhere else",
    errno.ENOSPC: "no space left on the device; free some space or write somewhere else",
    errno.EDQUOT: "disk quota exceeded; free some space or write somewhere else",
    errno.EFBIG: "file too large for this file system; write somewhere else",
    errno.ENOTDIR: "a file is in the way where a folder is needed; choose another path",
    errno.EEXIST: "a file is in the way where a folder is needed; choose another path",
    errno.EISDIR: "is a folder; give a file name",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
    errno.ENOENT: "no such file or folder (and it cannot be created there); choose another path",
}


def os_error_message(exc: OSError) -> str | None:
    """A one-line message with the fix for an OSError the user can act on; None for anything else."""
    fix = _OS_ERROR_FIXES.get(exc.errno or 0)
    if fix is None:
        return None
    return f"{exc.filename}: {fix}" if exc.filename else fix


def _os_error(exc: OSError, path: Path) -> OutputError:
    if exc.filename is None:
        exc.filename = str(path)
    return OutputError(os_error_message(exc) or f"cannot write {path}: {exc.strerror or exc}")


def _resolved(paths: Sequence[Path]) -> list[Path]:
    return [Path(p).expanduser().resolve() for p in paths]


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def _blocking_file(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` if it is not a folder (so ``path`` cannot be created)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _is_empty(folder: Path) -> bool:
    """A missing folder, or one holding nothing but the tool's marker, is empty."""
    return not folder.is_dir() or all(p.name == OUTPUT_MARKER for p in folder.iterdir())


@dataclass
class OutputDir:
    """A checked, created and marked output folder."""

    path: Path
    reused: bool  # it held an earlier output of the tool, whose files may now be replaced


def prepare_output_dir(
    out: Path,
    inputs: Sequence[Path] = (),
    *,
    option: str = "--out",
    force: bool = False,
    allow_reuse: bool = True,
) -> OutputDir:
    """Check ``out`` against the rules in the module docstring, create it and mark it as the tool's.

    ``inputs`` are the files and folders the command reads. ``allow_reuse=False`` also refuses a
    folder the tool wrote before (for outputs that must start empty). Calling it again on the same
    folder gives the same answer (a folder holding only the marker counts as empty).
    """
    out = Path(out).expanduser()
    target = out.resolve()
    for source in _resolved(inputs):
        if target == source:
            raise OutputError(
                f"{option} {out} is the input folder: its images would be overwritten; "
                f"choose a new folder, e.g. {option} {out.name or 'out'}_results"
            )
        if _inside(source, target):
            raise OutputError(
                f"{option} {out} contains the input {source}: outputs would mix with (or overwrite) "
                "the images; choose a folder outside it"
            )
        inside_input = source.is_dir() and _inside(target, source)
        if inside_input and not _is_empty(target) and not is_output_dir(target):
            raise OutputError(
                f"{option} {out} lies inside the input folder {source} and already holds files "
                "that would be read as inputs; choose a new or empty folder"
            )
    if target.exists() and not target.is_dir():
        raise OutputError(f"{option} {out} is a file, not a folder; choose a folder name")
    blocking = _blocking_file(target)
    if blocking is not None:
        raise OutputError(f"{option} {out}: {blocking} is a file, so the folder cannot be created; choose another path")
    reused = False
    if not _is_empty(target):
        if is_output_dir(target):
            if not allow_reuse:
                raise OutputError(f"{option} {out} holds an earlier output; choose a new or empty folder")
            reused = True
        elif not force:
            raise OutputError(
                f"{option} {out} is not empty and was not written by surfaceinspect; choose a new "
                "or empty folder, or pass --force to write into it"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            out / OUTPUT_MARKER,
            f"written by surfaceinspect {surfaceinspect.__version__}; image discovery skips this folder\n",
        )
    except OSError as exc:
        raise _os_error(exc, out) from None
    return OutputDir(out, reused)


def check_output_file(
    path: Path,
    inputs: Sequence[Path] = (),
    *,
    option: str = "--output",
    force: bool = False,
    written_by_tool: Callable[[Path], bool] = lambda _path: False,
) -> bool:
    """Check an output file against the rules in the module docstring; True if it replaces an existing file.

    ``written_by_tool(path)`` tells whether an existing file is one the tool wrote (replaced
    without ``--force``). The file itself is not created here.
    """
    path = Path(path).expanduser()
    target = path.resolve()
    if target.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name, e.g. {option} {path / 'results.csv'}")
    for source in _resolved(inputs):
        is_input = target == source or (
            source.is_dir()
            and _inside(target, source)
            and target.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in target.relative_to(source).parts)
        )
        if is_input:
            raise OutputError(f"{option} {path} is an input image; choose another file name")
    blocking = _blocking_file(target)
    if blocking is not None:
        raise OutputError(f"{option} {path}: {blocking} is a file, not a folder; choose another path")
    if not target.exists() or not stat.S_ISREG(os.stat(target).st_mode):
        return False  # new file, or a device / pipe such as /dev/stdout
    if force or written_by_tool(target):
        return True
    raise OutputError(
        f"{option} {path} exists and was not written by surfaceinspect; pass --force to replace "
        "it, or choose another name"
    )


def open_for_writing(path: Path, encoding: str = "utf-8") -> IO[str]:
    """``open(path, "w")`` with its parent folders; OS errors become an OutputError with the fix."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding=encoding, newline="")
    except OSError as exc:
        raise _os_error(exc, path) from None


def write_error(exc: OSError, path: Path) -> OutputError:
    """The OutputError for a failed write to ``path`` (disk full, device gone ...)."""
    return _os_error(exc, path)
