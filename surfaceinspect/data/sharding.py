"""Deterministic sharding of an image folder: ``--shard I/N`` of ``score`` and ``heatmap``.

N processes (a Slurm array, a Kubernetes indexed Job, GNU parallel, a CI matrix) each run with
their own ``I`` in ``0 .. N-1`` (0-based, like ``$SLURM_ARRAY_TASK_ID`` with ``--array=0-N-1``
and ``$JOB_COMPLETION_INDEX``) and together score every image exactly once, with no coordination:
an image belongs to shard ``blake2b(relative path) mod N``.

The key is the image's path relative to the input folder, POSIX-style (``/`` separators) and
NFC-normalised, so the split is the same on every machine, operating system and Python version,
whatever the absolute mount point of the folder. Python's ``hash()`` would not do: it is salted
per process (PYTHONHASHSEED).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from surfaceinspect.errors import ConfigError

_SHARD_RE = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


def shard_key(relative_path: str | PurePath) -> str:
    """The text that decides an image's shard: its relative path with ``/`` separators, NFC-normalised.

    A ``PureWindowsPath("a\\\\b.png")`` and a ``PurePosixPath("a/b.png")`` give the same key; a
    string is taken as already POSIX (on POSIX systems a backslash is an ordinary file-name character).
    """
    text = relative_path.as_posix() if isinstance(relative_path, PurePath) else str(relative_path)
    return unicodedata.normalize("NFC", text)


def shard_of(relative_path: str | PurePath, count: int) -> int:
    """The 0-based shard (``0 .. count-1``) that ``relative_path`` belongs to among ``count`` shards."""
    digest = hashlib.blake2b(shard_key(relative_path).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(_usage(f"{self.index}/{self.count}", self.index, self.count))

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with ``0 <= I < N`` -> Shard; a one-line ConfigError (exit 2) otherwise."""
        match = _SHARD_RE.match(text)
        if match is None:
            raise ConfigError(f"--shard {text}: expected I/N, e.g. --shard 0/4 (I counts from 0 to N-1)")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def contains(self, relative_path: str | PurePath) -> bool:
        return shard_of(relative_path, self.count) == self.index

    def select(self, paths: Sequence[Path], root: Path) -> list[Path]:
        """The ``paths`` (files under ``root``) that belong to this shard, in their given order."""
        if self.count == 1:
            return list(paths)
        return [p for p in paths if self.contains(_relative(p, root))]

    def describe(self, n_selected: int, n_total: int) -> str:
        """E.g. ``shard 2/4 (of shards 0..3): 26 of 100 images``."""
        return f"shard {self} (of shards 0..{self.count - 1}): {n_selected} of {n_total} images"


def _relative(path: Path, root: Path) -> PurePath:
    try:
        return path.relative_to(root)
    except ValueError:  # a single file given as the input: its name is the key, as in its record
        return PurePath(path.name)


def _usage(text: str, index: int, count: int) -> str:
    if count < 1:
        return f"--shard {text}: N must be at least 1"
    if index == count:
        return f"--shard {text}: I counts from 0, so the shards of {count} are 0/{count} .. {count - 1}/{count}"
    return f"--shard {text}: I must be between 0 and {count - 1} (the shards are 0/{count} .. {count - 1}/{count})"
