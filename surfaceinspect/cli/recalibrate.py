"""``surfaceinspect recalibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from surfaceinspect import cli
from surfaceinspect.cli import common
from surfaceinspect.errors import ConfigError
from surfaceinspect.ui import plural


@cli.app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect recalibrate ./good_after_relamp             (good images only)\n\n"
        "  surfaceinspect recalibrate ./labelled --labelled --calibration-mode f1   (good/ + defect subfolders)\n\n"
        "  surfaceinspect recalibrate --undo                          (restore the previous calibration)\n\n"
        "Refused (exit 2, nothing changed): fewer good images than training uses for calibration "
        "(common.calibration.min_images), a labelled folder without --labelled, and good images whose median "
        "scores at or above the current threshold (unless --force). The replaced calibration "
        "is kept as calibration.<time>.json in the run directory."
    )
)
@common.handle_errors
@common.run_options("batch_size", "workers", "threads", "device", "quiet")
def recalibrate(
    folder: Annotated[
        Path | None,
        typer.Argument(
            metavar="GOOD_DIR",
            help="Folder of good images (or, with --labelled, good/ + defect subfolders).",
            show_default=False,
        ),
    ] = None,
    model: common.ModelOpt = None,
    labelled: Annotated[bool, typer.Option("--labelled", help="GOOD_DIR has good/ and defect subfolders.")] = False,
    mode: Annotated[str | None, common.calibration_mode_option("--labelled", "the model's")] = None,
    mode_alias: Annotated[
        str | None, typer.Option("--mode", hidden=True, help="Old spelling of --calibration-mode.")
    ] = None,
    false_reject_rate: Annotated[float | None, common.false_reject_rate_option("the model's")] = None,
    target_recall: Annotated[
        float | None,
        typer.Option(
            "--target-recall",
            metavar="RATE",
            help="Recall mode: share of the defects to catch.",
            show_default="the model's",
        ),
    ] = None,
    undo: Annotated[
        bool, typer.Option("--undo", help="Restore the calibration that the last recalibrate replaced.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace the thresholds even when most new good images score at or above the current threshold "
            "(refused without it: such images look like defects; with it, only a warning).",
        ),
    ] = False,
    *,
    run: common.RunOptions,
) -> None:
    """Recompute a model's thresholds from new images without retraining (e.g. after a lighting change)."""
    from surfaceinspect import engine

    reporter = run.reporter()
    if undo:
        if folder is not None:
            raise ConfigError("--undo takes no GOOD_DIR: surfaceinspect recalibrate --undo [--model RUN]")
        change = engine.undo_recalibration(model)
        reporter.info(("restored", "green"), f" {change.backup.name if change.backup else '?'}: ")
        _print_thresholds(reporter, change)
        return
    if folder is None:
        raise ConfigError("give a folder of good images: surfaceinspect recalibrate ./good_images")
    engine.require_input(folder)
    # need_calibration=False: a missing, damaged or foreign calibration is what recalibrate replaces
    loaded = run.load(model, reporter, need_calibration=False)
    change = engine.recalibrate(
        loaded,
        folder,
        labelled=labelled,
        mode=common.old_spelling(mode, "--calibration-mode", mode_alias, "--mode"),
        false_reject_rate=false_reject_rate,
        target_recall=target_recall,
        batch_size=run.batch_size,
        workers=run.workers,
        reporter=reporter,
        force=force,
    )
    cal = change.calibration
    reporter.info(
        ("recalibrated", "green"),
        f" {loaded.run_dir} ({cal.mode}, {cal.n_good} good, {plural(cal.n_defective, 'defective image')}; "
        f"model id now {change.model_id}):",
    )
    _print_thresholds(reporter, change)
    if change.backup is not None:
        reporter.info(f"  previous calibration kept as {change.backup.name}; `recalibrate --undo` restores it")


def _print_thresholds(reporter: Any, change: Any) -> None:
    old, new = change.previous, change.calibration
    image_old, pixel_old = (f"{old.image_threshold:.5g}", f"{old.pixel_threshold:.5g}") if old else ("?", "?")
    reporter.info(
        f"  image threshold {image_old} -> {new.image_threshold:.5g}, "
        f"pixel threshold {pixel_old} -> {new.pixel_threshold:.5g}"
    )
