"""``surfaceinspect heatmap``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surfaceinspect import cli
from surfaceinspect.cli import common, reporting
from surfaceinspect.ui import Part


@cli.app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect heatmap ./line_camera_dump --out heatmaps/\n\n"
        "  surfaceinspect heatmap ./dump --out heatmaps/ --save-maps   (also .npy maps)\n\n"
        "  surfaceinspect heatmap ./dump --out ./dump/heatmaps/       (a subfolder: later runs skip it)\n\n"
        "  surfaceinspect heatmap ./dump --shard 0/4 --out heatmaps/shard-0   (one folder per shard)\n\n"
        "Open heatmaps/index.html in a browser: all overlays sorted by score, the unreadable files, the "
        "model and its thresholds.\n\n" + common.EXIT_CODES_HELP
    )
)
@common.handle_errors
@common.run_options("batch_size", "workers", "threads", "device", "quiet")
def heatmap(
    images_dir: common.ImagesArg,
    out: Annotated[
        Path,
        common.out_option(
            "DIR for overlays, maps and index.html: new, empty, or an earlier heatmap output. Never the input "
            "folder; a subfolder of it is marked so that later runs skip it."
        ),
    ],
    model: common.ModelOpt = None,
    save_maps: Annotated[
        bool, typer.Option("--save-maps", help="Also write <name>.npy: float32 HxW map, same scale as the score.")
    ] = False,
    opacity: Annotated[
        float | None,
        typer.Option(
            "--opacity",
            min=0.0,
            max=1.0,
            metavar="ALPHA",
            help="Heat opacity at the threshold (0 = outlines only; it rises to 1.4x this on the hottest pixels, "
            "so the defect stays visible).",
            show_default="0.4",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", metavar="FILE", help="Also write records to FILE.csv/.jsonl (see score)."),
    ] = None,
    force: common.ForceOpt = False,
    fail_on_defect: common.FailOnDefectOpt = True,
    shard: common.ShardOpt = None,
    runtime: common.RuntimeOpt = "auto",
    *,
    run: common.RunOptions,
) -> None:
    """Render each image with its anomaly map, defect outlines and verdict; write index.html.

    Colours are on the calibrated scale (not per image): a good image stays calm, a defect
    glows, and outlines mark the regions above the pixel threshold.
    """
    from surfaceinspect import engine
    from surfaceinspect.storage.outputs import lock_output, prepare_output_dir

    reporter = run.reporter()
    selected = common.parse_shard(shard)
    engine.require_input(images_dir)
    # Fail before the model loads, on a refused or locked --out (the engine checks and locks it again).
    prepare_output_dir(out, [images_dir], force=force, refuse_links=True)
    lock_output(out, "--out", "folder").release()
    writer = reporting.open_records(output, None, [images_dir], force, reporter)
    complete = False
    try:
        loaded = run.load(model, reporter, runtime=runtime)
        summary, index = engine.heatmap_folder(
            loaded,
            images_dir,
            out,
            save_maps=save_maps,
            on_result=(lambda r: writer.write(r.record)) if writer else None,
            batch_size=run.batch_size,
            workers=run.workers,
            reporter=reporter,
            force=force,
            opacity=opacity,
            shard=selected,
        )
        complete = True
    finally:
        reporting.close_records([writer] if writer else [], complete, reporter)
    outputs: list[Part] = [f"overlays: {out}   index: {index}"]
    reporting.print_summary(summary, run.quiet, False, ([f"records: {output}"] if output is not None else []) + outputs)
    raise typer.Exit(summary.exit_code(fail_on_defect))
