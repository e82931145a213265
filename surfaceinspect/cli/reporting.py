"""What score, heatmap, watch and serve print and write besides their results: the model line, the summary
of verdicts, and the record writers' opening and closing messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from surfaceinspect import cli
from surfaceinspect.ui import Part, plural, styled


def _summary_table(summary: Any, title: str) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("verdict")
    table.add_column("images", justify="right")
    table.add_row(Text("good", "green"), str(summary.n_good))
    table.add_row(Text("defect", "red"), str(summary.n_defect))
    table.add_row(Text("unreadable", "yellow"), str(summary.n_error))
    return table


def _worst_table(summary: Any) -> Table:
    from surfaceinspect.storage.records import format_score  # the one score format (summary, watch, gallery)

    table = Table(title="highest scores", show_header=True)
    table.add_column("score", justify="right")
    table.add_column("verdict")
    table.add_column("image")
    for score, path, verdict in summary.worst:
        table.add_row(format_score(score), verdict, Text(path))  # file names are shown as they are
    return table


def print_summary(summary: Any, quiet: bool, json_out: bool, outputs: list[Part], title: str | None = None) -> None:
    """The verdict counts, the highest scores, the unreadable files and where the outputs went."""
    console = cli.err_console if json_out else cli.out_console
    if quiet:
        return
    console.print(_summary_table(summary, title or f"{plural(summary.total, 'image')} in {summary.seconds:.1f} s"))
    if summary.worst:
        console.print(_worst_table(summary))
    if summary.unreadable:
        shown = len(summary.unreadable)
        head = f"unreadable images ({'all ' if shown == summary.n_error else f'first {shown} of '}{summary.n_error}):"
        console.print(styled((head, "yellow")), highlight=False)
        for path, reason in summary.unreadable:
            console.print(styled(f"  {path}: {reason}"), highlight=False)
    if summary.drift is not None:
        console.print(styled((summary.drift.describe(), "yellow" if summary.drift.detected else "")), highlight=False)
    for part in outputs:
        console.print(styled(part), highlight=False)


def open_records(output: Path | None, fmt: str | None, inputs: list[Path], force: bool, reporter: Any) -> Any:
    from surfaceinspect.storage.records import RecordWriter

    writer = RecordWriter.open(output, fmt, inputs=inputs, force=force)
    if writer is None or writer.part is None:
        return writer
    if writer.leftover_part:
        reporter.info(f"replacing {writer.part}, left by an interrupted run")
    if writer.replaced:
        why = "--force" if force else "records of an earlier run"
        reporter.info(
            f"replacing {output} ({why}) when this run completes; until then it is kept as it is, and the new "
            f"records go to {writer.part}"
        )
    else:
        reporter.info(f"records go to {writer.part} and become {output} when the run completes")
    return writer


def close_records(writers: list[Any], complete: bool, reporter: Any) -> None:
    """Close every records writer; after an incomplete run, say where its records are."""
    for writer in writers:
        kept = writer.close(complete)
        if kept is not None:
            reporter.warn(
                f"the run did not complete: its {writer.count} record(s) are in {kept}; {writer.target} "
                + ("is unchanged" if writer.replaced else "was not written")
            )


def _runtime_note(loaded: Any) -> str:
    """' [onnx: FOLDER]' or ' [torch on cpu]': the operator sees which runtime scores."""
    export_dir = getattr(loaded.detector, "export_dir", None)
    if export_dir is not None:
        return f" [{loaded.detector.runtime}: {export_dir}]"
    return f" [torch on {loaded.detector.device}]"


def report_model(reporter: Any, loaded: Any, extra: str = "") -> None:
    """The model line (folder, method, model id, threshold, runtime), then its notes as warnings."""
    threshold = f", threshold {loaded.calibration.image_threshold:.5g}" if loaded.calibration is not None else ""
    reporter.info(
        f"model: {loaded.run_dir} ({loaded.detector.name}, model id {loaded.model_id}{threshold})"
        + _runtime_note(loaded)
        + extra
    )
    for note in loaded.notes:
        reporter.warn(note)
