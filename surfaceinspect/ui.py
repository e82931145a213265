"""Terminal output: messages and progress bars on stderr (stdout stays free for machine output)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from surfaceinspect.detectors.base import TrainProgress


class Reporter:
    """Where the engine sends human-readable output. ``quiet=True`` keeps only warnings."""

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None, unit: str = "img") -> Iterator[ProgressBar]:
        """A progress bar with rate and ETA; a no-op bar when quiet."""
        if self.quiet:
            yield ProgressBar(None, None)
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(description, total=total, rate="", extra="")
            yield ProgressBar(progress, task, unit)


class ProgressBar:
    """Thin handle over one rich task."""

    def __init__(self, progress: Progress | None, task: TaskID | None, unit: str = "img") -> None:
        self._progress = progress
        self._task = task
        self._unit = unit

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
        self._progress.update(self._task, **kwargs)
        speed = self._progress.tasks[self._task].speed if self._task < len(self._progress.tasks) else None
        if speed:
            self._progress.update(
                self._task, rate=f"{speed:.2f} {self._unit}/s" if speed >= 0.1 else f"{1 / speed:.1f} s/{self._unit}"
            )


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
