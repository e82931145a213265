"""Terminal output: messages and progress bars on stderr (stdout stays free for machine output).

Text is never parsed as Rich markup: file names from cameras contain brackets (``lot[/b]good.png``,
``[bold red]x.png``) that markup would hide, restyle or crash on. A message is built from plain
strings, printed as they are, and ``(text, style)`` pairs for colour (see :func:`styled`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

if TYPE_CHECKING:  # the CLI imports this module; torch only when a detector is used
    from surfaceinspect.detectors.base import TrainProgress

# A part of a message: plain text (shown literally), a (text, style) pair, or a rich Text.
Part = str | tuple[str, str] | Text


def styled(*parts: Part) -> Text:
    """A rich Text from plain strings (never parsed as markup) and ``(text, style)`` pairs."""
    return Text.assemble(*parts)


def plural(n: int, word: str, plural_form: str | None = None) -> str:
    """``1 image``, ``2 images`` (``plural_form`` for irregular words)."""
    return f"{n} {word if n == 1 else plural_form or word + 's'}"


class Reporter:
    """Where the engine sends human-readable output. ``quiet=True`` keeps only warnings."""

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet

    def info(self, *parts: Part) -> None:
        """A message (plain strings and ``(text, style)`` pairs, see :func:`styled`); hidden when quiet."""
        if not self.quiet:
            self.console.print(styled(*parts), highlight=False)

    def warn(self, *parts: Part) -> None:
        """A warning, shown even when quiet."""
        self.console.print(styled(("warning:", "yellow"), " ", *parts), highlight=False)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None, unit: str = "img") -> Iterator[ProgressBar]:
        """A progress bar with rate and ETA; a no-op bar when quiet."""
        if self.quiet:
            yield ProgressBar(None, None)
            return
        columns = (
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}", markup=False),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}", markup=False),
            TextColumn("{task.fields[extra]}", markup=False),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(description, total=total, rate="", eta="-:--:--", extra="")
            yield ProgressBar(progress, task, unit)


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class ProgressBar:
    """Thin handle over one rich task, with its own rate and ETA.

    Rich's speed estimate divides by the time between its first and last samples, which on a
    short run (all images of a batch reported at once) gives absurd rates (thousands of images
    per second for 12 images in 1.5 s). Here the rate is the work done since the bar started (or,
    for absolute ``completed`` reports such as a resumed training, since the first report)
    divided by the wall time since then.
    """

    def __init__(self, progress: Progress | None, task: TaskID | None, unit: str = "img") -> None:
        self._progress = progress
        self._task = task
        self._unit = unit
        self._start_time = time.monotonic()
        self._start_count: float | None = None

    def update(self, completed: int | None = None, advance: int = 0, total: int | None = None, extra: str = "") -> None:
        if self._progress is None or self._task is None:
            return
        kwargs: dict[str, Any] = {"extra": extra}
        if total is not None:
            kwargs["total"] = total
        if completed is not None:
            kwargs["completed"] = completed
        else:
            kwargs["advance"] = advance
        if self._start_count is None:
            if completed is not None:  # the first absolute report (may be a resumed step): measure from here
                self._start_count, self._start_time = completed, time.monotonic()
            else:
                self._start_count = 0
        self._progress.update(self._task, **kwargs)
        task = self._progress.tasks[self._task]
        kwargs = {}
        done, elapsed = task.completed - self._start_count, time.monotonic() - self._start_time
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            kwargs["rate"] = f"{rate:.2f} {self._unit}/s" if rate >= 0.1 else f"{1 / rate:.1f} s/{self._unit}"
            if task.total is not None:
                kwargs["eta"] = _clock(max(task.total - task.completed, 0) / rate)
        self._progress.update(self._task, **kwargs)


class TrainProgressView:
    """Turns a detector's TrainProgress reports into one progress bar per phase."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._stack = contextlib.ExitStack()
        self._phase: str | None = None
        self._bar: ProgressBar | None = None

    def __call__(self, report: TrainProgress) -> None:
        if report.phase != self._phase:
            self._stack.close()
            self._stack = contextlib.ExitStack()
            self._bar = self._stack.enter_context(self.reporter.progress(report.phase, report.total, unit="step"))
            self._phase = report.phase
        extra = f"loss {report.loss:.4f}" if report.loss is not None else ""
        assert self._bar is not None
        self._bar.update(completed=report.step, total=report.total, extra=extra)

    def close(self) -> None:
        self._stack.close()
