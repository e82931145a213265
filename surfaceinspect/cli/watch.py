"""``surfaceinspect watch``."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from surfaceinspect import cli
from surfaceinspect.cli import common, reporting
from surfaceinspect.errors import EXIT_INTERRUPTED, EXIT_OK
from surfaceinspect.ui import Part, plural


@cli.app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect watch /camera/line3 --output line3.jsonl\n\n"
        "  surfaceinspect watch /camera/line3 -o line3.csv --defects-dir /camera/line3/defects\n\n"
        "  surfaceinspect watch /camera/line3 -o line3.jsonl --on-defect '/opt/plc/reject --line 3'\n\n"
        "  surfaceinspect watch /mnt/share/cam -o cam.jsonl --poll   (network share: events from other machines "
        "do not arrive)\n\n"
        "  surfaceinspect watch ./inbox -o batch.jsonl --idle-timeout 60   (stop after a minute without new images)\n\n"
        "Restarting with the same --output continues it: images already recorded there are not scored again.\n\n"
        "Exit codes: 0 stopped by SIGTERM (how systemd stops a service) · 130 interrupted by Ctrl-C (records written "
        "so far are complete either way) · after --stop-after/--idle-timeout, as score for the images of this "
        "session: 0 all good · 1 a defect (0 with --no-fail-on-defect) · 3 some unreadable · 2 usage, input, output "
        "or model error · 4 internal error · 5 drift detected (only with --fail-on-drift)."
    )
)
@common.handle_errors
@common.run_options("batch_size", "threads", "device", "quiet")
def watch(
    folder: Annotated[
        Path,
        typer.Argument(
            metavar="WATCH_DIR", help="Folder the images are written into (watched recursively).", show_default=False
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Records FILE (.csv or .jsonl), one flushed line per image, appended. An existing records file is "
            "continued: the images it holds are not scored again.",
        ),
    ],
    model: common.ModelOpt = None,
    fmt: common.FormatOpt = None,
    on_defect: Annotated[
        str | None,
        typer.Option(
            "--on-defect",
            metavar="CMD",
            help="Run CMD with the defective image's path as its last argument (no shell: CMD is split into words, "
            "nothing in a file name is interpreted). The record is in $SURFACEINSPECT_RECORD (JSON), "
            "$SURFACEINSPECT_SCORE and $SURFACEINSPECT_SCORE_NORMALIZED. Up to 4 run at once; a failure is a warning.",
        ),
    ] = None,
    defects_dir: Annotated[
        Path | None,
        typer.Option(
            "--defects-dir",
            metavar="DIR",
            help="Copy each defective image to DIR/<relative path>. May be a subfolder of the watched folder "
            "(marked as an output, so it is not watched); never the folder itself.",
        ),
    ] = None,
    existing: Annotated[
        bool,
        typer.Option(
            "--existing/--no-existing",
            help="Also score the images already in the folder at start (those not yet in --output); "
            "--no-existing: only images written after the start.",
        ),
    ] = True,
    settle: Annotated[
        float,
        typer.Option(
            "--settle",
            min=0.0,
            metavar="SECONDS",
            help="Score a file once its size and time stamp have not changed for SECONDS (its writer is done). "
            "An unreadable file gets 5x as long (a writer may pause) before its error is recorded.",
        ),
    ] = 0.5,
    stop_after: Annotated[
        int | None, typer.Option("--stop-after", min=1, metavar="N", help="Stop after N new records.")
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            "--idle-timeout", min=0.0, metavar="SECONDS", help="Stop after SECONDS without a new image to score."
        ),
    ] = None,
    poll: Annotated[
        bool,
        typer.Option(
            "--poll", help="Poll the folder instead of using file events (network shares such as NFS or SMB)."
        ),
    ] = False,
    force: common.ForceOpt = False,
    drift_window: common.DriftWindowOpt = 50,
    fail_on_drift: common.FailOnDriftOpt = False,
    fail_on_defect: common.FailOnDefectOpt = True,
    *,
    run: common.RunOptions,
) -> None:
    """Score each new image written into WATCH_DIR, as soon as it is complete; append its record to --output.

    Files are judged complete when their size and time stamp stop changing (--settle), or when
    they are renamed into place (write .name.png.tmp or name.png.part, then rename). Unreadable
    files get an error record and never stop the watch. Runs until SIGTERM (a clean stop, exit 0),
    Ctrl-C (exit 130), --stop-after or --idle-timeout; the summary covers the images of this session.
    """
    from surfaceinspect import engine
    from surfaceinspect.workflows.watch import WatchOptions, check_outputs, watch_folder

    reporter = run.reporter()
    engine.require_input(folder)
    fmt_name = fmt.value if fmt is not None else None
    options = WatchOptions(
        settle_s=settle,
        existing=existing,
        stop_after=stop_after,
        idle_timeout_s=idle_timeout,
        poll=poll,
        on_defect=on_defect,
        defects_dir=defects_dir,
        drift_window=drift_window,
    )
    check_outputs(folder, output, options, fmt=fmt_name, force=force)  # refused outputs fail before the model loads
    stop = threading.Event()
    with _signals_set(stop) as received:  # from here on SIGTERM stops the watch: how a service is stopped
        loaded = run.load(model, reporter)
        options.batch_size = run.batch_size or loaded.detector.run_config.common.batch_size
        result = watch_folder(
            loaded, folder, output, options, fmt=fmt_name, force=force, reporter=reporter, stop_event=stop
        )
    if received:  # the first signal decides: SIGTERM is a requested stop, Ctrl-C an interruption
        result.stopped_by = "terminated" if received[0] == signal.SIGTERM else "interrupted"
    summary = result.summary
    extra: list[Part] = [f"records: {output}"]
    if result.already_recorded:
        extra.append(f"({plural(result.already_recorded, 'image')} recorded by earlier runs)")
    if defects_dir is not None:
        extra.append(f"defect copies: {defects_dir} ({len(result.copied)} this session)")
    if result.stopped_by == "terminated":
        extra.append("stopped by SIGTERM")
    title = f"{plural(summary.total, 'image')} in {result.watched_s:.1f} s of watching, {summary.seconds:.1f} s scoring"
    reporting.print_summary(summary, run.quiet, False, extra, title)
    if result.stopped_by == "interrupted":
        raise common.fail("interrupted; the records written are complete", EXIT_INTERRUPTED)
    if result.stopped_by == "terminated":
        raise typer.Exit(EXIT_OK)  # a requested stop ends a service cleanly, whatever it saw
    raise typer.Exit(common.verdict_exit_code(summary, fail_on_drift, fail_on_defect))


@contextlib.contextmanager
def _signals_set(stop: threading.Event) -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM (systemd, Kubernetes, kill) set ``stop``: the watch ends after the batch in hand.

    A flag instead of an exception raised wherever the signal lands: the record being written, the
    data loader and the on-defect commands all finish cleanly. A second Ctrl-C interrupts at once.
    Yields the list of the signals received, in order (the caller tells a stop from an interruption).
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # A shell starts background jobs with SIGINT ignored (so Ctrl-C in the terminal spares them); keep that.
    handled = [sig for sig, handler in previous.items() if handler is not signal.SIG_IGN]

    def request_stop(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()
        if signal.SIGINT in handled:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in handled:
        signal.signal(sig, request_stop)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
