"""Per-image result records and their streaming CSV / JSON Lines writers.

Each record is written as one complete line and flushed at once, so a run that is killed leaves
a file of complete records only (at most the record being written is lost).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from surfaceinspect.errors import ConfigError

FIELDS = (
    "path",
    "verdict",
    "score",
    "score_normalized",
    "n_regions",
    "largest_region_area",
    "bbox_x",
    "bbox_y",
    "bbox_width",
    "bbox_height",
    "width",
    "height",
    "error",
)


@dataclass
class ScoreRecord:
    """The result for one image. ``verdict`` is ``good``, ``defect`` or ``error``."""

    path: str
    verdict: str
    score: float | None = None
    score_normalized: float | None = None
    n_regions: int | None = None
    largest_region_area: int | None = None
    bbox_x: int | None = None  # bounding box of the largest region, in pixels of the input image
    bbox_y: int | None = None
    bbox_width: int | None = None
    bbox_height: int | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("score", "score_normalized"):
            if out[key] is not None:
                out[key] = round(float(out[key]), 6) if math.isfinite(out[key]) else None
        return out


class RecordWriter:
    """Streams records to a CSV or JSONL file (or stdout), one flushed line per record."""

    def __init__(self, handle: IO[str], fmt: str, close: bool) -> None:
        self._handle = handle
        self._fmt = fmt
        self._close = close
        if fmt == "csv":
            self._write_line(",".join(FIELDS) + "\n")

    @classmethod
    def open(cls, target: Path | None, fmt: str | None = None, to_stdout: bool = False) -> RecordWriter | None:
        """A writer for ``target`` (format from ``fmt`` or the extension) or for stdout; None if neither."""
        if to_stdout:
            return cls(sys.stdout, fmt or "jsonl", close=False)
        if target is None:
            return None
        fmt = fmt or output_format(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        return cls(open(target, "w", encoding="utf-8", newline=""), fmt, close=True)

    def _write_line(self, line: str) -> None:
        self._handle.write(line)
        self._handle.flush()

    def write(self, record: ScoreRecord) -> None:
        data = record.to_dict()
        if self._fmt == "jsonl":
            self._write_line(json.dumps(data, ensure_ascii=False) + "\n")
        else:
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerow(["" if data[k] is None else data[k] for k in FIELDS])
            self._write_line(buffer.getvalue())

    def close(self) -> None:
        if self._close:
            self._handle.close()


def output_format(path: Path) -> str:
    """``csv`` or ``jsonl`` from a file name; a ConfigError for anything else."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise ConfigError(f"--output {path}: use a .csv or .jsonl file name (or pass --format csv|jsonl)")
