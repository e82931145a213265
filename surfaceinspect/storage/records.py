"""Per-image result records and their streaming CSV / JSON Lines writers.

Each record is written as one complete line and flushed at once, so a run that is killed leaves
a file of complete records only (at most the record being written is lost).

A records file is never emptied before its replacement is complete: ``score``/``heatmap`` write
``FILE.part`` beside ``FILE`` and rename it over ``FILE`` (atomically) only when the run completes.
A run that fails or is interrupted leaves ``FILE`` as it was (an earlier run's records stay) and
keeps what it computed in ``FILE.part`` (and says so); a kill leaves the same two files. Only one
process writes a records file at a time (:func:`~surfaceinspect.storage.outputs.lock_output`).

CSV cells are neutralised for spreadsheets (OWASP "CSV injection"): a text cell starting with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return (a file named ``=1+2.png``) gets a leading
``'``, so Excel or LibreOffice show it as text instead of evaluating it. Numbers are written as
they are; JSON Lines records are never altered.

The fields and their meaning are documented in one place, docs/records.md. New
fields are only ever appended (readers that select columns by name keep working); files of the
earlier field set (:data:`LEGACY_FIELDS`) are still recognised and continued in their own columns.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import math
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from surfaceinspect.errors import ConfigError, OutputError
from surfaceinspect.storage.atomic import fsync_dir
from surfaceinspect.storage.outputs import OutputLock, check_output_file, lock_output, open_for_writing, write_error

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
FORMATS = ("csv", "jsonl")


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
    # Appended by issue #30 (traceability); earlier fields keep their names, order and meaning.
    model_id: str | None = None  # first 12 hex of the SHA-256 of the model folder's manifest (SHA256SUMS)
    threshold: float | None = None  # the image threshold the verdict was made with (raw score units)
    runtime: str | None = None  # what computed the score: torch, onnx or openvino
    time: str | None = None  # when the verdict was made, ISO-8601 UTC
    warnings: list[str] = field(default_factory=list)  # why this verdict may not be reliable

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("score", "score_normalized"):
            if out[key] is not None:
                out[key] = round(float(out[key]), 6) if math.isfinite(out[key]) else None
        return out


# Column order of CSV files and key order of JSON records: the ScoreRecord fields, in order.
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ScoreRecord))
# The fields before model_id .. warnings were appended: files of earlier versions have these.
LEGACY_FIELDS: tuple[str, ...] = FIELDS[: FIELDS.index("model_id")]
WARNINGS_SEPARATOR = "; "  # joins the warnings into one CSV cell


def utc_now() -> str:
    """The current time as ISO-8601 UTC with milliseconds (``2024-06-01T12:00:00.123Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def format_score(value: float | None) -> str:
    """A raw score as shown everywhere a person reads it (summary, watch, gallery): 5 significant digits."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.5g}"


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that a spreadsheet will not evaluate: text starting like a formula gets a leading '."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def undo_spreadsheet_safe(value: str) -> str:
    """The text of a CSV cell as it was before :func:`spreadsheet_safe` (reading records back)."""
    if value.startswith("'") and value[1:].startswith(_FORMULA_START):
        return value[1:]
    return value


def part_path(target: Path) -> Path:
    """Where a run writes the records that replace ``target`` when it completes: ``target.part``."""
    real = Path(target).expanduser().resolve()  # a symlinked records file stays a link to the new records
    return real.with_name(real.name + ".part")


class RecordWriter:
    """Streams records to a CSV or JSONL file (or stdout), one flushed line per record.

    With ``part`` the lines go to that file, which :meth:`close` renames over ``target`` once the
    run is complete; ``lock`` (the output's lock) is released by :meth:`close`.
    """

    def __init__(
        self,
        handle: IO[str],
        fmt: str,
        close: bool,
        target: Path | None = None,
        header: bool = True,
        columns: Sequence[str] = FIELDS,
        *,
        part: Path | None = None,
        lock: OutputLock | None = None,
    ) -> None:
        self._handle = handle
        self._fmt = fmt
        self._close = close
        self.target = target
        self.columns = tuple(columns)  # CSV: LEGACY_FIELDS when continuing a file of an earlier version
        self.part = part
        self._lock = lock
        self.count = 0  # records written
        self.replaced = False  # the file existed (an earlier records file, or --force) and is replaced
        self.leftover_part = False  # a .part file of an interrupted run was in the way (and is replaced)
        if fmt == "csv" and header:  # no header when appending to a file that has one (watch)
            self._write_line(",".join(self.columns) + "\n")

    @classmethod
    def open(
        cls,
        target: Path | None,
        fmt: str | None = None,
        to_stdout: bool = False,
        *,
        inputs: Sequence[Path] = (),
        force: bool = False,
    ) -> RecordWriter | None:
        """A writer for ``target`` (format from ``fmt`` or the extension) or for stdout; None if neither.

        ``target`` follows the output rules of :mod:`surfaceinspect.storage.outputs`: never one of
        ``inputs``, and an existing file is replaced only if it is a records file written by
        surfaceinspect (or with ``force``). A regular file is locked and written through
        :func:`part_path` (see the module docstring); a device or pipe is written as it is.
        """
        if to_stdout:
            return cls(sys.stdout, fmt or "jsonl", close=False)
        if target is None:
            return None
        fmt = output_format(target, fmt)
        replaced = check_output_file(target, inputs, force=force, written_by_tool=is_records_file)
        if target.exists() and not stat.S_ISREG(os.stat(target).st_mode):
            return cls(open_for_writing(target), fmt, close=True, target=target)
        lock = lock_output(target, "--output")
        try:
            part = part_path(target)
            leftover = check_output_file(part, inputs, force=force, written_by_tool=is_records_file)
            writer = cls(open_for_writing(part), fmt, close=True, target=target, part=part, lock=lock)
        except BaseException:
            lock.release()
            raise
        writer.replaced, writer.leftover_part = replaced, leftover
        return writer

    def _write_line(self, line: str) -> None:
        try:
            self._handle.write(line)
            self._handle.flush()
        except OSError as exc:
            if self.target is None:
                raise
            raise write_error(exc, self.part or self.target) from None

    def write(self, record: ScoreRecord) -> None:
        data = record.to_dict()
        if self._fmt == "jsonl":
            self._write_line(json.dumps(data, ensure_ascii=False) + "\n")
        else:
            buffer = io.StringIO()
            data["warnings"] = WARNINGS_SEPARATOR.join(data["warnings"]) or None
            row = ["" if data[k] is None else spreadsheet_safe(data[k]) for k in self.columns]
            csv.writer(buffer, lineterminator="\n").writerow(row)
            self._write_line(buffer.getvalue())
        self.count += 1

    def close(self, complete: bool = True) -> Path | None:
        """Finish writing; returns the part file kept by an incomplete run (None otherwise).

        ``complete``: the part file replaces ``target`` (flushed to disk first, so a power cut never
        leaves an empty or half file under the final name). Not complete (the run failed or was
        interrupted): ``target`` stays as it was, and the part file keeps the records written, or is
        removed if there are none.
        """
        try:
            return self._finish(complete) if self._close else None
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _finish(self, complete: bool) -> Path | None:
        commit = complete and self.part is not None
        try:
            if commit:
                self._handle.flush()
                os.fsync(self._handle.fileno())
            self._handle.close()
            if commit:
                real = Path(self.target or self.part).expanduser().resolve()
                os.replace(self.part, real)
                fsync_dir(real.parent)
        except OSError as exc:
            raise write_error(exc, self.part or self.target or Path("?")) from None
        if self.part is None or complete:
            return None
        if self.count == 0:  # nothing computed: no file to keep
            with contextlib.suppress(OSError):
                self.part.unlink()
            return None
        return self.part


_CSV_HEADERS = (",".join(FIELDS) + "\n", ",".join(LEGACY_FIELDS) + "\n")
_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def output_format(path: Path, fmt: str | None = None) -> str:
    """``csv`` or ``jsonl`` for ``path``: ``fmt`` if given, else from the extension.

    A ConfigError for an unknown extension without ``fmt``, and for a known extension that
    contradicts ``fmt`` (``x.csv`` with ``--format jsonl`` would hold JSON Lines in a .csv file).
    """
    by_suffix = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: use csv or jsonl")
    if fmt is not None and by_suffix is not None and fmt != by_suffix:
        raise ConfigError(
            f"--output {path} --format {fmt}: the extension says {by_suffix}; name the file "
            f"{path.with_suffix('.' + fmt).name} or drop --format"
        )
    if fmt is None and by_suffix is None:
        raise ConfigError(f"--output {path}: use a .csv or .jsonl file name (or pass --format csv|jsonl)")
    return fmt or by_suffix  # type: ignore[return-value]


def is_records_file(path: Path) -> bool:
    """Whether ``path`` holds records written by surfaceinspect (or nothing at all), judged by its first line."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            first = handle.readline(1 << 16)
    except (OSError, UnicodeDecodeError):
        return False
    if not first:
        return True  # empty: nothing to lose
    if first in _CSV_HEADERS:
        return True
    try:
        data = json.loads(first)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and set(data) in (set(FIELDS), set(LEGACY_FIELDS))


def csv_columns(path: Path) -> tuple[str, ...] | None:
    """The columns of an existing CSV records file (the current or the earlier field set), else None."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            first = handle.readline(1 << 16)
    except (OSError, UnicodeDecodeError):
        return None
    return FIELDS if first == _CSV_HEADERS[0] else LEGACY_FIELDS if first == _CSV_HEADERS[1] else None


# Appending to a records file (watch --output, serve --records)


def recorded_paths(path: Path, fmt: str, option: str = "--output") -> set[str]:
    """The image paths recorded in an existing records file (empty if there is none).

    An incomplete last line (the process was killed while writing it) is cut off, so the file
    holds complete records only and that image is scored again.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return set()
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as handle:
            handle.truncate(cut)
        data = data[:cut]
    text = data.decode("utf-8", errors="replace")
    if fmt == "csv":
        return {undo_spreadsheet_safe(row["path"]) for row in csv.DictReader(text.splitlines(keepends=True))}
    paths = set()
    for number, line in enumerate(text.splitlines(), 1):
        try:
            paths.add(json.loads(line)["path"])
        except (ValueError, TypeError, KeyError, RecursionError):
            if line.strip():
                raise OutputError(
                    f"{option} {path}: line {number} is not a record; give a new file or repair this one"
                ) from None
    return paths


def open_records_for_append(
    output: Path,
    fmt: str | None,
    folder: Path,
    force: bool,
    option: str = "--output",
    force_option: str | None = "--force",
) -> tuple[RecordWriter, set[str], str]:
    """Open ``output`` to append records; returns (writer, paths already recorded, format).

    An existing records file of surfaceinspect is continued; any other existing file is refused
    (with ``force``: replaced). Follows :mod:`surfaceinspect.storage.outputs` (never an input image).
    ``option`` is the flag that named the file, ``force_option`` the one that replaces it (None: none),
    for messages (watch ``--output`` / ``--force``, serve ``--records`` without one).
    """
    fmt = output_format(output, fmt)
    exists = check_output_file(
        output, [folder], option=option, force=force, written_by_tool=is_records_file, force_option=force_option
    )
    resume = exists and is_records_file(output)
    if resume and fmt == "csv" and output.stat().st_size and not _has_csv_header(output):
        raise OutputError(f"{option} {output} holds JSON Lines records; name the file .jsonl")
    if resume and fmt == "jsonl" and output.stat().st_size and _has_csv_header(output):
        raise OutputError(f"{option} {output} holds CSV records; name the file .csv")
    # Locked before reading: a second watch (or a score) on the same file would interleave records.
    lock = lock_output(output, option)
    handle = None
    try:
        handle = _open_append(output) if resume else open_for_writing(output)
        done = recorded_paths(output, fmt, option) if resume else set()
        handle.seek(0, os.SEEK_END)
    except BaseException:
        if handle is not None:
            handle.close()
        lock.release()
        raise
    empty = handle.tell() == 0
    # A CSV file of an earlier version is continued in its own columns: rows must match its header.
    columns = (csv_columns(output) or FIELDS) if fmt == "csv" and not empty else FIELDS
    writer = RecordWriter(handle, fmt, close=True, target=output, header=empty, columns=columns, lock=lock)
    return writer, done, fmt


def _open_append(output: Path) -> Any:
    try:
        return open(output, "a", encoding="utf-8", newline="")  # closed by the RecordWriter
    except OSError as exc:
        raise OutputError(f"cannot append to {output}: {exc.strerror or exc}") from None


def _has_csv_header(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        return handle.readline().startswith("path,verdict,")
