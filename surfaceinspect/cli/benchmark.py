"""``surfaceinspect benchmark``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surfaceinspect import cli
from surfaceinspect.cli import common
from surfaceinspect.ui import styled


@cli.app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect benchmark ../shared/data/mtd --method draem --method csflow --out bench/\n\n"
        "  surfaceinspect benchmark DATA --method csflow --model runs/csflow-... --out bench/  (no training)\n\n"
        "  surfaceinspect benchmark DATA -m draem --model RUN --set draem.smoothing_kernel=11 --out b/  (re-score)\n\n"
        "  surfaceinspect benchmark DATA -m csflow --seed 0 --seed 1 --seed 2 --out bench/   (mean and spread)\n\n"
        "  surfaceinspect benchmark DATA --method draem --quick --out /tmp/bench   (about a minute)"
    ),
    cls=common.LiveHelpCommand,
)
@common.handle_errors
def benchmark(
    datasets: Annotated[
        list[Path], typer.Argument(metavar="DATASET", help="MVTec-layout dataset roots (train/good, test/...).")
    ],
    out: Annotated[
        Path,
        common.out_option("DIR for report.json, report.md and ROC plots (new or empty)."),
    ],
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            "-m",
            metavar="METHOD",
            help="Methods to compare (repeatable): auto (the candidate table adds each candidate's test AUROC and "
            "the rank agreement), {methods}.",
            show_default="auto",
        ),
    ] = None,
    profile: common.ProfileOpt = None,
    config: common.ConfigOpt = None,
    set_: common.SetOpt = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", metavar="RUN", help="Evaluate this trained run instead of training (one dataset)."),
    ] = None,
    keep_models: Annotated[
        Path | None,
        typer.Option(
            "--keep-models",
            metavar="DIR",
            help="Keep the trained runs in DIR/<dataset>-<method> (new or empty; usable with score, heatmap, --model).",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Few images and steps: checks the pipeline in about a minute.")
    ] = False,
    seed: Annotated[
        list[int] | None,
        typer.Option(
            "--seed",
            metavar="N",
            help="Train once per seed (repeatable: --seed 0 --seed 1 --seed 2); the report adds mean, std, "
            "min and max over the seeds.",
            show_default="the config's common.seed, once",
        ),
    ] = None,
    force: common.ForceOpt = False,
    device: common.DeviceOpt = None,
    quiet: common.QuietOpt = False,
) -> None:
    """Train, calibrate and evaluate methods on datasets: accuracy, speed and memory in one report.

    With --model RUN nothing is trained: the run is evaluated as it is, or, with --set on its
    inference settings (e.g. --set draem.smoothing_kernel=11), re-scored and recalibrated on its
    own held-out images, without changing the run's files.

    Accuracy: image AUROC/AP, F1 at the calibrated threshold and best F1, pixel AUROC and AUPRO
    (where masks exist), per defect type and overall. Cost: training time and images/s,
    inference images/s at batch 1 and batched, latency p50/p95, peak memory, device, threads.
    """
    from surfaceinspect.storage.outputs import prepare_output_dir
    from surfaceinspect.workflows.benchmark import BenchmarkOptions, run_benchmark

    common.require_full_install()
    reporter = common.make_reporter(quiet)
    prepare_output_dir(out, datasets, force=force)
    if keep_models is not None:
        prepare_output_dir(keep_models, datasets, option="--keep-models", force=force, allow_reuse=False)
    options = BenchmarkOptions(
        datasets=datasets,
        methods=method or ["auto"],
        out_dir=out,
        profile=profile,
        config_file=config,
        sets=set_ or [],
        model_dir=model,
        keep_models=keep_models,
        quick=quick,
        device=device,
        seeds=seed or [],
    )
    report = run_benchmark(options, reporter)
    if not quiet:
        from surfaceinspect.workflows.benchmark_report import summary_table

        cli.out_console.print(summary_table(report))
        from surfaceinspect.workflows.selection import selection_rich_table

        for entry in report["entries"]:
            if entry.get("selection"):
                cli.out_console.print(f"{entry['dataset']}, seed {entry.get('seed')}:", highlight=False)
                for renderable in selection_rich_table(entry["selection"]):
                    cli.out_console.print(renderable)
        cli.out_console.print(styled(f"report: {out / 'report.md'}  {out / 'report.json'}"), highlight=False)
