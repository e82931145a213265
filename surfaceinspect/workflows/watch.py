"""Watch mode (``surfaceinspect watch``): score each image written into a folder, as it appears.

File events come from ``watchfiles`` (Rust ``notify``: inotify, FSEvents, ReadDirectoryChanges,
or polling for network shares, where events from other machines never arrive). An event only
says that a file changed, not that its writer is done, so a file is scored once its size and
modification time have stayed the same for ``settle_s`` seconds (:class:`SettleTracker`); a file
renamed into place (write ``.img.png.tmp`` or ``img.png.part``, then rename) is complete when it
appears and is scored after the same short wait. A file that cannot be decoded gets more time
(its writer may have paused): it is retried whenever it changes, and recorded as an error only
once it has stayed unchanged for ``error_grace_s``.

Records go to one CSV/JSONL file, one flushed line per image, appended: on a restart the paths
already recorded there are not scored again (an incomplete last line, left by a kill, is dropped
and its image rescored). Each path is scored at most once per output file.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surfaceinspect.analysis.drift import DEFAULT_WINDOW
from surfaceinspect.data.imageio import IMAGE_EXTENSIONS, discover_images, is_output_dir
from surfaceinspect.errors import ConfigError
from surfaceinspect.storage.outputs import check_output_file, prepare_output_dir
from surfaceinspect.storage.records import (
    RecordWriter,
    ScoreRecord,
    format_score,
    is_records_file,
    open_records_for_append,
    output_format,
)
from surfaceinspect.ui import Reporter
from surfaceinspect.workflows.defect_actions import DefectHook, copy_defect

# How often the loop wakes up without events to check files that are settling (seconds).
TICK_S = 0.05


# ---------------------------------------------------------------------------------------------
# When is a file completely written?


@dataclass
class _Pending:
    signature: tuple[int, int]  # (size, mtime_ns) when last seen changed
    since: float  # clock time at which the signature was last seen changing
    failed: bool = False  # it was read at this signature and could not be decoded


@dataclass
class Ready:
    """A file judged complete; ``final``: its writer has had ``error_grace_s``, so an error is recorded."""

    path: Path
    final: bool
    signature: tuple[int, int]
    since: float


class SettleTracker:
    """Files seen changing, and when each is complete enough to score (see the module docstring)."""

    def __init__(self, settle_s: float, error_grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle_s = settle_s
        self.error_grace_s = max(error_grace_s, settle_s)
        self._clock = clock
        self._pending: dict[Path, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, path: Path) -> bool:
        return path in self._pending

    def touch(self, path: Path) -> None:
        """A file was created or changed: watch it until it stays unchanged."""
        signature = _signature(path)
        if signature is None:
            self._pending.pop(path, None)
            return
        entry = self._pending.get(path)
        if entry is None or entry.signature != signature:
            self._pending[path] = _Pending(signature, self._clock())

    def forget(self, path: Path) -> None:
        self._pending.pop(path, None)

    def failed(self, ready: Ready) -> None:
        """A file handed out by :meth:`due` could not be decoded: retry it when it changes (or at the grace)."""
        self.restore(ready, failed=True)

    def restore(self, ready: Ready, failed: bool = False) -> None:
        """Put back a file handed out by :meth:`due` (not scored after all), keeping its time of last change."""
        signature = _signature(ready.path)
        if signature == ready.signature:
            self._pending[ready.path] = _Pending(signature, ready.since, failed)
        elif signature is not None:
            self._pending[ready.path] = _Pending(signature, self._clock())

    def due(self) -> list[Ready]:
        """The files to score now (removed from the tracker), oldest change first."""
        now = self._clock()
        ready: list[Ready] = []
        for path, entry in list(self._pending.items()):
            signature = _signature(path)
            if signature is None:  # deleted or moved away before it was scored
                del self._pending[path]
                continue
            if signature != entry.signature:
                self._pending[path] = _Pending(signature, now)
                continue
            quiet = now - entry.since
            final = quiet >= self.error_grace_s
            if final or (not entry.failed and quiet >= self.settle_s and signature[0] > 0):
                del self._pending[path]
                ready.append(Ready(path, final, signature, entry.since))
        return sorted(ready, key=lambda r: r.since)


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------------
# Which files are images of the watched folder?


class ImageFilter:
    """Image files under ``root`` as :func:`~surfaceinspect.data.imageio.discover_images` sees them.

    Hidden names (temporary files such as ``.img.png.tmp``), other suffixes (``img.png.part``)
    and anything inside an output folder of surfaceinspect are not images of the folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def relative(self, path: Path) -> str | None:
        """The record path (relative, POSIX) of an image of the folder, or None for anything else."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        if not rel.parts or path.suffix.lower() not in IMAGE_EXTENSIONS:
            return None
        if any(part.startswith(".") for part in rel.parts):
            return None
        folder = self.root
        for part in rel.parts[:-1]:  # not cached: an output folder gets its marker just after it appears
            folder = folder / part
            if is_output_dir(folder):
                return None
        return rel.as_posix()


# ---------------------------------------------------------------------------------------------
# The records file: resume and append


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class WatchOptions:
    """What ``watch`` does besides scoring; see ``surfaceinspect watch --help``."""

    settle_s: float = 0.5
    error_grace_s: float | None = None  # default: 5 x settle_s
    existing: bool = True
    stop_after: int | None = None
    idle_timeout_s: float | None = None
    rescan_s: float = 60.0
    poll: bool = False
    batch_size: int = 8
    on_defect: str | None = None
    defects_dir: Path | None = None
    drift_window: int = DEFAULT_WINDOW  # good verdicts per drift check (surfaceinspect.analysis.drift)


def check_outputs(
    folder: Path,
    output: Path,
    options: WatchOptions,
    *,
    fmt: str | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> DefectHook | None:
    """Check (and create) what a watch writes, before a model is loaded; returns the --on-defect hook.

    Idempotent, so :func:`watch_folder` calls it again.
    """
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; watch needs the folder the images are written into")
    output_format(output, fmt)
    check_output_file(output, [folder], force=force, written_by_tool=is_records_file)
    if options.defects_dir is not None:
        prepare_output_dir(options.defects_dir, [folder], option="--defects-dir", refuse_links=True)
    return DefectHook(options.on_defect, reporter or Reporter(quiet=True)) if options.on_defect else None


@dataclass
class WatchResult:
    """How a watch ended: the counts of this session, and why it stopped."""

    summary: Any  # engine.ScoreSummary of the images scored in this session (its seconds: time spent scoring)
    already_recorded: int
    stopped_by: str  # "stop-after", "idle-timeout", "interrupted" or "stop-event" ("terminated": set by the CLI)
    watched_s: float = 0.0  # how long the watch ran
    hook_failures: int = 0
    copied: list[Path] = field(default_factory=list)


class _BatchScorer:
    """Scores files judged complete and writes their records: the per-record work of :func:`watch_folder`."""

    def __init__(
        self,
        model: Any,
        root: Path,
        options: WatchOptions,
        writer: RecordWriter,
        done: set[str],
        result: WatchResult,
        reporter: Reporter,
        hook: DefectHook | None,
        on_record: Callable[[ScoreRecord], None] | None,
    ) -> None:
        from surfaceinspect.engine import drift_monitor, reliability_checks

        self.model, self.root, self.options, self.writer, self.done = model, root, options, writer, done
        self.result, self.reporter, self.hook, self.on_record = result, reporter, hook, on_record
        self.checks = reliability_checks(model.metadata, model.detector.run_config)
        result.summary.drift = self.drift = drift_monitor(model, options.drift_window)

    def __call__(self, batch: Sequence[Ready], tracker: SettleTracker) -> None:
        from surfaceinspect.engine import run_inference

        began = time.monotonic()
        by_path = {r.path: r for r in batch}
        for item in run_inference(
            [r.path for r in batch],
            self.root,
            self.model.detector,
            self.model.calibration,
            batch_size=len(batch),
            workers=0,
            model_id=self.model.model_id,
            runtime=self.model.runtime,
            checks=self.checks,
        ):
            record = item.record
            if record.verdict == "error" and not by_path[item.item.path].final:
                tracker.failed(by_path[item.item.path])  # its writer may be pausing: retry when it changes
                continue
            self.drift.track(record, self.reporter)  # before writing: a drift warning belongs in the record
            self.writer.write(record)
            self.done.add(record.path)
            self.result.summary.add(record)
            if self.on_record is not None:
                self.on_record(record)
            if record.verdict == "defect":
                self._defect(item.item.path, record)
            elif record.verdict == "error":
                self.reporter.warn(f"unreadable {record.path}: {record.error}")
        self.result.summary.seconds += time.monotonic() - began  # the time spent scoring, for the summary

    def _defect(self, image: Path, record: ScoreRecord) -> None:
        self.reporter.info(("defect", "red"), f" score {format_score(record.score)} ", record.path)
        defects_dir = self.options.defects_dir
        if defects_dir is not None:
            try:
                self.result.copied.append(copy_defect(image, record.path, defects_dir))
            except OSError as exc:
                self.reporter.warn(f"could not copy {record.path} to {defects_dir}: {exc.strerror or exc}")
        if self.hook is not None:
            self.hook(image, record)

    def close(self) -> None:
        for check in self.checks:
            check.report(self.reporter)


def _file_events(root: Path, options: WatchOptions, stop_event: Any) -> Any:
    """The watchfiles iterator over ``root``: it also yields (empty) every TICK_S, so settling files are checked."""
    import watchfiles

    return watchfiles.watch(
        root,
        watch_filter=None,
        debounce=200,
        step=20,
        rust_timeout=max(1, int(TICK_S * 1000)),
        yield_on_timeout=True,
        stop_event=stop_event,
        force_polling=options.poll or None,
        poll_delay_ms=100,
        raise_interrupt=True,
    )


def _take_changes(changes: Iterable[tuple[Any, str]], tracker: SettleTracker, consider: Callable[..., None]) -> None:
    """Track the files that file events name (a deleted one is forgotten; a folder moved in brings its images)."""
    import watchfiles

    for change, raw in changes:
        path = Path(raw)
        if change == watchfiles.Change.deleted:
            tracker.forget(path)
        elif path.is_dir():
            consider(discover_images(path))
        else:
            consider([path])


def _score_ready(
    ready: list[Ready], tracker: SettleTracker, score: _BatchScorer, options: WatchOptions, stop_event: Any
) -> None:
    """Score the files due, batch by batch; stop between batches (never inside one) or at --stop-after."""
    while ready:
        room = options.batch_size
        if options.stop_after is not None:
            room = min(room, options.stop_after - score.result.summary.total)
        if (stop_event is not None and stop_event.is_set()) or room <= 0:
            for leftover in ready:
                tracker.restore(leftover)
            return
        batch, ready = ready[:room], ready[room:]
        score(batch, tracker)


def watch_folder(
    model: Any,
    folder: Path,
    output: Path,
    options: WatchOptions,
    *,
    fmt: str | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    stop_event: Any = None,
    on_record: Callable[[ScoreRecord], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> WatchResult:
    """Score images as they are written into ``folder`` until a stop condition; see the module docstring.

    ``model`` is an :class:`~surfaceinspect.engine.LoadedModel`. Stops after ``stop_after`` new
    records, after ``idle_timeout_s`` without a new image (nothing pending either), when
    ``stop_event`` (anything with ``is_set()``) is set, or on Ctrl-C (``stopped_by ==
    "interrupted"``, records written so far are complete and flushed). ``on_record`` is called
    after each record is written, ``on_ready`` once the watcher runs (files written from then on
    are seen). Every ``drift_window`` good verdicts are checked for drift (``result.summary.drift``).
    """
    from surfaceinspect.engine import ScoreSummary

    reporter = reporter or Reporter(quiet=True)
    root = folder.expanduser().resolve()
    hook = check_outputs(folder, output, options, fmt=fmt, force=force, reporter=reporter)
    writer, done, _fmt = open_records_for_append(output, fmt, folder, force)
    if done:
        reporter.info(f"resuming {output}: {len(done)} image(s) already recorded are not scored again")
    images = ImageFilter(root)
    grace = options.error_grace_s if options.error_grace_s is not None else 5.0 * options.settle_s
    tracker = SettleTracker(options.settle_s, grace)
    result = WatchResult(ScoreSummary(), len(done), "stop-event")
    score = _BatchScorer(model, root, options, writer, done, result, reporter, hook, on_record)
    started_wall = time.time()
    started = time.monotonic()
    last_activity = time.monotonic()
    next_rescan = time.monotonic() + options.rescan_s if options.rescan_s > 0 else float("inf")

    def consider(paths: Iterable[Path], *, new_only: bool = False) -> None:
        for path in paths:
            rel = images.relative(path)
            if rel is None or rel in done or path in tracker:
                continue
            if new_only and _mtime(path) < started_wall:
                continue  # --no-existing: a file older than the watch is not new
            tracker.touch(path)

    watcher = _file_events(root, options, stop_event)
    first = True
    try:
        for changes in watcher:
            _take_changes(changes, tracker, consider)
            if first:  # the watcher is running now, so no file written from here on can be missed
                first = False
                # files written since the start but before the watcher ran count as new ones
                consider(discover_images(root), new_only=not options.existing)
                last_activity = time.monotonic()  # --idle-timeout counts from here
                if on_ready is not None:
                    on_ready()
                reporter.info(f"watching {folder} ({'polling' if options.poll else 'file events'}); records: {output}")
            if time.monotonic() >= next_rescan:  # catch files whose event was lost (queue overflow, shares)
                next_rescan = time.monotonic() + options.rescan_s
                consider(discover_images(root), new_only=not options.existing)
            ready = tracker.due()
            if ready or len(tracker):
                last_activity = time.monotonic()
            _score_ready(ready, tracker, score, options, stop_event)
            if hook is not None:
                hook.reap()
            if stop_event is not None and stop_event.is_set():
                break
            if options.stop_after is not None and result.summary.total >= options.stop_after:
                result.stopped_by = "stop-after"
                break
            idle = time.monotonic() - last_activity
            if options.idle_timeout_s is not None and not len(tracker) and idle >= options.idle_timeout_s:
                result.stopped_by = "idle-timeout"
                break
    except KeyboardInterrupt:
        result.stopped_by = "interrupted"
    finally:
        score.close()
        result.watched_s = time.monotonic() - started
        with contextlib.suppress(Exception):
            watcher.close()
        writer.close()
        if hook is not None:
            hook.close()
            result.hook_failures = hook.failures
    return result


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
