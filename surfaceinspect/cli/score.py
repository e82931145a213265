"""``surfaceinspect score``."""

from __future__ import annotations

from typing import Annotated

import typer

from surfaceinspect import cli
from surfaceinspect.cli import common, reporting


@cli.app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect score ./line_camera_dump\n\n"
        "  surfaceinspect score ./dump --output results.csv     (or .jsonl)\n\n"
        "  surfaceinspect score ./dump --json | jq 'select(.verdict==\"defect\")'\n\n"
        "  surfaceinspect score ./dump --shard $SLURM_ARRAY_TASK_ID/8 --output scores-$SLURM_ARRAY_TASK_ID.jsonl\n\n"
        + common.EXIT_CODES_HELP
    )
)
@common.handle_errors
@common.run_options("batch_size", "workers", "threads", "device", "quiet")
def score(
    images_dir: common.ImagesArg,
    model: common.ModelOpt = None,
    output: common.RecordsOpt = None,
    fmt: common.FormatOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Write JSON Lines records to stdout (and nothing else to stdout).")
    ] = False,
    force: common.ForceOpt = False,
    fail_on_defect: common.FailOnDefectOpt = True,
    shard: common.ShardOpt = None,
    runtime: common.RuntimeOpt = "auto",
    drift_window: common.DriftWindowOpt = 50,
    fail_on_drift: common.FailOnDriftOpt = False,
    *,
    run: common.RunOptions,
) -> None:
    """Score images with a trained model: a verdict per image, defect regions, a summary.

    One record per image: path (relative to IMAGES), verdict (good/defect/error), score (the
    raw anomaly score: defect if score >= threshold), regions and their bounding box, image size,
    error, and for traceability model_id, threshold, runtime, time and warnings (what each field
    means: docs/records.md). In CSV, text starting with = + - @ gets a leading ' (spreadsheets
    would run it as a formula). Unreadable images are reported and skipped; they never stop the run.
    """
    from surfaceinspect import engine
    from surfaceinspect.storage.records import RecordWriter

    reporter = run.reporter()
    selected = common.parse_shard(shard)
    engine.require_input(images_dir)
    # Outputs are checked (and opened) before the model loads: a refused path fails in a second.
    fmt_name = fmt.value if fmt is not None else None
    writers = [reporting.open_records(output, fmt_name, [images_dir], force, reporter)]
    if json_out:
        writers.append(RecordWriter.open(None, fmt_name, to_stdout=True))
    active = [w for w in writers if w is not None]
    complete = False
    try:
        loaded = run.load(model, reporter, runtime=runtime)
        summary = engine.score_folder(
            loaded,
            images_dir,
            on_result=lambda r: [w.write(r.record) for w in active],
            batch_size=run.batch_size,
            workers=run.workers,
            reporter=reporter,
            shard=selected,
            drift_window=drift_window,
        )
        complete = True
    finally:
        reporting.close_records(active, complete, reporter)
    reporting.print_summary(summary, run.quiet, json_out, [f"records: {output}"] if output is not None else [])
    raise typer.Exit(common.verdict_exit_code(summary, fail_on_drift, fail_on_defect))
