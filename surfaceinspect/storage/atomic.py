"""Atomic file writes: a reader never sees a partial file, a crash leaves the old one intact.

With ``below=ROOT`` a write also never goes through a symbolic link below the output folder
``ROOT``: the folders from ROOT down are opened one by one with ``O_NOFOLLOW`` (and the file is
created and renamed relative to its folder's descriptor), so a link put there, even while the
run is going on, fails the write with ``ELOOP`` instead of redirecting it elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", *, below: str | Path | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync and rename it over ``path``.

    If the body raises (or the process dies), ``path`` is untouched and the temporary
    file is removed (or, after a hard kill, left as a hidden ``.<name>.*.tmp`` file).
    ``below``: the output folder ``path`` lies in; no link below it is followed (module docstring).
    """
    path = Path(path)
    if below is not None and _DIR_FD_OK:
        dir_fd = open_dir_below(Path(below), path.parent)
        try:
            with _atomic_at(dir_fd, path, mode) as handle:
                yield handle
        finally:
            os.close(dir_fd)
        return
    if below is not None:  # no *at() system calls (Windows): check, then write by path
        refuse_links_below(Path(below), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    encoding = None if "b" in mode else "utf-8"
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


_DIR_FD_OK = {os.open, os.mkdir, os.stat, os.unlink, os.rename} <= os.supports_dir_fd and hasattr(os, "O_NOFOLLOW")
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _link_error(path: Path) -> OSError:
    return OSError(errno.ELOOP, "symbolic link below an output folder", str(path))


def open_dir_below(root: Path, folder: Path) -> int:
    """A descriptor of ``folder`` (created, like ``root``, as needed), reached from ``root`` without following links.

    ``root`` itself may be a link (the user named it); below it, a link, or a file where a folder
    is needed, raises OSError (``ELOOP`` / ``ENOTDIR``) naming it.
    """
    parts = folder.relative_to(root).parts  # ValueError: not below root (a caller's bug)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, _DIR_FLAGS)
    try:
        here = root
        for part in parts:
            here = here / part
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o777, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                error = _link_error(here) if _is_link_at(fd, part) else OSError(exc.errno, exc.strerror, str(here))
                raise error from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link_at(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def _atomic_at(dir_fd: int, path: Path, mode: str) -> Iterator[IO[Any]]:
    """:func:`atomic_open` of ``path.name`` in the folder ``dir_fd`` (a link in the way is refused)."""
    name = path.name
    if _is_link_at(dir_fd, name):
        raise _link_error(path)  # rename would replace the link; refused like any link below the root
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    # 0o666 and the umask: the permissions a plain open() gives
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)


def refuse_links_below(root: Path, path: Path) -> None:
    """Raise OSError (``ELOOP``) if a folder between ``root`` and ``path``, or ``path``, is a link."""
    here = root
    for part in path.relative_to(root).parts:
        here = here / part
        if here.is_symlink():
            raise _link_error(here)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not supported everywhere, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes, *, below: str | Path | None = None) -> None:
    """Write ``data`` to ``path`` atomically (``below``: see :func:`atomic_open`)."""
    with atomic_open(path, "wb", below=below) as handle:
        handle.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
