"""Where a command may write: one set of rules for every output path of every command.

No command writes over its inputs or over a file it did not create:

* Nothing is written through a symbolic link below an output folder (the folder itself may be
  one): a reused folder holding a link is refused, and writes open each folder without following
  links (:func:`~surfaceinspect.storage.atomic.atomic_open` ``below``), so a link made meanwhile fails too.
* An output **folder** may not be an input folder, nor contain one. It may lie inside an input
  folder only as a dedicated subfolder (new, empty, or an earlier output of the tool); every
  output folder is marked with :data:`~surfaceinspect.data.imageio.OUTPUT_MARKER`, and image discovery
  skips marked folders, so outputs are never read back as inputs.
* An existing, non-empty folder that the tool did not mark is refused unless ``--force``.
* An output **file** may never be an input image (not even with ``--force``). An existing file is
  replaced only when the tool wrote it (the caller recognises its own files by their content) or
  with ``--force``. Devices and pipes (``/dev/stdout``) are written as they are.
* A path that cannot be written (permissions, a file where a folder is needed, a read-only or
  full disk) is an :class:`~surfaceinspect.errors.OutputError` with a one-line fix, never a crash.
* One process at a time writes an output (:func:`lock_output`): a second ``score``, ``heatmap``,
  ``train`` or ``watch`` given the same file or folder fails at once, naming the process that
  holds it, instead of splicing its records or files into the first one's.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import surfaceinspect
from surfaceinspect.data.imageio import IMAGE_EXTENSIONS, OUTPUT_MARKER, is_output_dir
from surfaceinspect.errors import OutputError
from surfaceinspect.storage.atomic import write_text_atomic

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
    errno.ELOOP: "is a symbolic link inside an output folder; outputs are never written through links: remove it, "
    "or choose a new output folder",
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


def _first_link(folder: Path) -> Path | None:
    """The first symbolic link below ``folder`` (links are not followed), or None."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return None
    for entry in entries:
        if entry.is_symlink():
            return Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            found = _first_link(Path(entry.path))
            if found is not None:
                return found
    return None


def _refuse_links_inside(out: Path, option: str) -> None:
    link = _first_link(out)
    if link is not None:
        raise OutputError(
            f"{option} {out}: {link} is a symbolic link (to {os.readlink(link)}); outputs are never written "
            "through links: remove it, or choose a new folder"
        )


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
    refuse_links: bool = False,
) -> OutputDir:
    """Check ``out`` against the rules in the module docstring, create it and mark it as the tool's.

    ``inputs`` are the files and folders the command reads. ``allow_reuse=False`` also refuses a
    folder the tool wrote before (for outputs that must start empty); ``refuse_links`` refuses a
    folder with a symbolic link anywhere below it (for outputs written into subfolders). Calling it again on the same
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
    if refuse_links and target.is_dir():
        _refuse_links_inside(out, option)
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
    force_option: str | None = "--force",
) -> bool:
    """Check an output file against the rules in the module docstring; True if it replaces an existing file.

    ``written_by_tool(path)`` tells whether an existing file is one the tool wrote (replaced
    without ``--force``). ``force_option``: the command's flag that replaces anyway, named in the
    refusal (None: it has none). The file itself is not created here.
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
    replace = f"pass {force_option} to replace it, or " if force_option else ""
    raise OutputError(f"{option} {path} exists and was not written by surfaceinspect; {replace}choose another name")


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


# ---------------------------------------------------------------------------------------------
# One writer per output


class OutputLock:
    """An exclusive lock on an output path, held by this process until :meth:`release`.

    The lock is ``flock`` on a hidden file beside the output, ``.<name>.lock``: beside rather
    than inside, so a folder can be locked before it exists or is checked (two ``train --out X``
    must not both pass the "no model here yet" check), and nothing is added to the output itself.
    The kernel drops the lock when the process ends, however it ends, so a killed run never
    blocks the next one; the file holds the holder's pid, host and command for the message of a
    refused run, and is removed on release. Not re-entrant: a second lock of the same output in
    the same process is refused too.
    """

    def __init__(self, path: Path | None, fd: int | None) -> None:
        self.path = path  # the lock file (None: locking is not possible there, see lock_output)
        self.fd = fd

    def release(self) -> None:
        """Give the lock up (a second call does nothing)."""
        if self.fd is None:
            return
        # Unlinked while still locked: a process that opened the old file sees another inode once
        # it gets the lock, and starts over with a new file (see _locked_fd).
        if self.path is not None and _same_file(self.fd, self.path):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def lock_file_path(path: Path) -> Path:
    """The lock file of an output file or folder: ``.<name>.lock`` beside it (by its real path)."""
    target = Path(path).expanduser().resolve()
    return target.parent / f".{target.name}.lock"


def lock_output(path: Path, option: str, what: str | None = "file") -> OutputLock:
    """Take the lock of output ``path`` (see :class:`OutputLock`), or refuse at once with one line.

    ``what`` names the output in the fix ("give each run its own file"); None: no such advice.

    Refused (:class:`OutputError`, exit 2) while another process holds it. Devices and pipes
    (``/dev/stdout``) are not locked. Where no lock file can be made (a read-only parent of a
    writable folder, a file system without ``flock``), the output is written unlocked, as before.
    """
    target = Path(path).expanduser().resolve()
    if target.exists() and not (target.is_dir() or stat.S_ISREG(os.stat(target).st_mode)):
        return OutputLock(None, None)
    fd = _locked_fd(target, option, Path(path), what)
    return OutputLock(lock_file_path(target) if fd is not None else None, fd)


def _locked_fd(target: Path, option: str, given: Path, what: str | None) -> int | None:
    """An open lock file of ``target``, locked and holding this process's description; None: cannot lock."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one writer per output is the user's job there
        return None
    lock_path = lock_file_path(target)
    while True:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise _os_error(exc, lock_path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            alternative = f", or give each run its own {what}" if what else ""
            raise OutputError(
                f"{option} {given} is being written by another surfaceinspect process ({holder}); "
                f"wait for it to finish{alternative}"
            ) from None
        except OSError:  # e.g. ENOLCK on a network share without lock support
            os.close(fd)
            return None
        if _same_file(fd, lock_path):
            _write_holder(fd)
            return fd
        os.close(fd)  # its holder removed it just before we got the lock: take the new one


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _write_holder(fd: int) -> None:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(["surfaceinspect", *sys.argv[1:]]),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(OSError):  # the lock itself is what matters; the description is a courtesy
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _holder(fd: int) -> str:
    """Who holds a lock, from its lock file: ``pid 123 on host, `surfaceinspect score ...`, since ...``."""
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        return f"pid {data['pid']} on {data['host']}, `{data['command']}`, since {data['since']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "its description is not readable"
