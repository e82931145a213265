"""The ``surfaceinspect`` command line: thin wrappers over :mod:`surfaceinspect.engine`."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

import surfaceinspect
from surfaceinspect.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    SurfaceInspectError,
)

EXIT_CODES_HELP = (
    "Exit codes: 0 all images good · 1 at least one defect · 3 some images unreadable (no defect) · "
    "2 usage, input, config or model error · 4 internal error (rerun with --debug) · 130 interrupted."
)

app = typer.Typer(
    name="surfaceinspect",
    help=(
        "Find surface defects with anomaly detection trained on good images only.\n\n"
        "Typical use:\n\n"
        "  surfaceinspect train --method draem ./good_images\n\n"
        "  surfaceinspect score ./line_camera_dump --output results.csv\n\n"
        "  surfaceinspect heatmap ./line_camera_dump --out heatmaps/\n\n" + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

err_console = Console(stderr=True)
out_console = Console()
_state: dict[str, bool] = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> typer.Exit:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """One clear line instead of a traceback (unless --debug), with the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except SurfaceInspectError as exc:
            if _state["debug"]:
                raise
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", EXIT_INTERRUPTED) from None
        except MemoryError:
            raise _fail("out of memory; lower --batch-size or --image-size", EXIT_USAGE) from None
        except Exception as exc:
            if _state["debug"]:
                raise
            raise _fail(
                f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)",
                EXIT_INTERNAL,
            ) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out_console.print(f"surfaceinspect {surfaceinspect.__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug


# ---------------------------------------------------------------------------------------------
# Shared options

MethodOpt = Annotated[str | None, typer.Option("--method", "-m", help="Detector: draem or csflow. [default: draem]")]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        "-p",
        help="Named profile from sample_configs/ (cpu, paper, ...) or a YAML path. "
        "[default: paper with CUDA, cpu without]",
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config; overrides the profile, flags override it.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any setting: --set draem.epochs=20 --set common.seed=1 (repeatable)."),
]
ModelOpt = Annotated[
    Path | None, typer.Option("--model", help="Run directory written by train. [default: the latest trained model]")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N. [default: auto]")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=0, help="Image-reading worker processes (0 = main process).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info, only warnings and errors.")]


def _reporter(quiet: bool):
    from surfaceinspect.ui import Reporter

    return Reporter(err_console, quiet=quiet)


# ---------------------------------------------------------------------------------------------
# train


@app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect train --method draem ./good_images\n\n"
        "  surfaceinspect train -m csflow ./good_images --profile cpu --time-budget 20\n\n"
        "  surfaceinspect train -m draem ./good --set draem.anomaly_source=~/dtd/images\n\n"
        "  surfaceinspect train -m draem ./good --print-config      (show the effective config)\n\n"
        "  surfaceinspect train --resume latest                     (continue an interrupted run)"
    )
)
@handle_errors
def train(
    data_dir: Annotated[
        Path | None, typer.Argument(help="Folder of defect-free images (searched recursively).", show_default=False)
    ] = None,
    method: MethodOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Network input size (square).")] = None,
    batch_size: BatchOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Training epochs.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    time_budget: Annotated[
        float | None, typer.Option("--time-budget", help="Minutes: shorten the schedule to finish within this.")
    ] = None,
    device: DeviceOpt = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    workers: WorkersOpt = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch (0 = all cores).")] = None,
    anomaly_source: Annotated[
        str | None,
        typer.Option(
            "--anomaly-source",
            help="DRAEM: folder of texture images (e.g. DTD), or builtin (= self: transformed crops of the "
            "good images), fractal, structured.",
        ),
    ] = None,
    backbone_weights: Annotated[
        Path | None,
        typer.Option("--backbone-weights", help="CS-Flow: local file with the backbone's ImageNet weights."),
    ] = None,
    calibration_fraction: Annotated[
        float | None, typer.Option("--calibration-fraction", help="Share of good images kept for calibration.")
    ] = None,
    false_reject_rate: Annotated[
        float | None, typer.Option("--false-reject-rate", help="Target share of good images flagged defective.")
    ] = None,
    calibration_dir: Annotated[
        Path | None,
        typer.Option("--calibration-dir", help="Labelled folder (good/ + defect subfolders) to calibrate on instead."),
    ] = None,
    calibration_mode: Annotated[
        str | None,
        typer.Option("--calibration-mode", help="quantile | f1 | recall (f1/recall need --calibration-dir)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run directory to write. [default: new one under the runs folder]"),
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue an interrupted run: its directory, or 'latest'.")
    ] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the effective config and exit.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a detector on a folder of good images, calibrate its threshold, save the model.

    A share of the images (--calibration-fraction, at least common.calibration.min_images) is held
    out to set the decision threshold for --false-reject-rate. The run directory (weights,
    metadata.json, calibration.json) becomes the default model of `score` and `heatmap`.
    """
    from surfaceinspect import engine, modeldir

    reporter = _reporter(quiet)
    if resume is not None:
        run_dir = modeldir.find_resumable() if resume == "latest" else Path(resume)
        result = engine.train(None, None, reporter=reporter, resume_dir=run_dir, calibration_dir=calibration_dir)
    else:
        run_config = engine.resolve_run_config(
            method,
            profile,
            config,
            common_flags={
                "image_size": image_size,
                "batch_size": batch_size,
                "device": device,
                "seed": seed,
                "workers": workers,
                "threads": threads,
                "time_budget_min": time_budget,
                "calibration.fraction": calibration_fraction,
                "calibration.false_reject_rate": false_reject_rate,
                "calibration.mode": calibration_mode,
            },
            method_flags={
                "epochs": epochs,
                "lr": lr,
                "anomaly_source": anomaly_source,
                "backbone_weights": str(backbone_weights) if backbone_weights else None,
            },
            sets=set_ or [],
        )
        if print_config:
            sys.stdout.write(run_config.to_yaml())
            raise typer.Exit(EXIT_OK)
        if data_dir is None:
            raise typer.BadParameter(
                "give the folder of good images: surfaceinspect train --method draem ./good_images"
            )
        result = engine.train(data_dir, run_config, reporter=reporter, run_dir=out, calibration_dir=calibration_dir)
    cal = result.calibration
    reporter.info(
        f"[green]done[/green] in {result.summary.get('total_seconds', 0):.0f} s — "
        f"model: [bold]{result.run_dir}[/bold]\n"
        f"  threshold {cal.image_threshold:.5g} ({cal.mode}, {cal.n_good} good calibration images"
        + (f", false-reject target {cal.target.get('false_reject_rate')}" if cal.mode == "quantile" else "")
        + ")"
    )


# ---------------------------------------------------------------------------------------------
# score


def _summary_table(summary: Any, title: str) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("verdict")
    table.add_column("images", justify="right")
    table.add_row("[green]good[/green]", str(summary.n_good))
    table.add_row("[red]defect[/red]", str(summary.n_defect))
    table.add_row("[yellow]unreadable[/yellow]", str(summary.n_error))
    return table


def _worst_table(summary: Any) -> Table:
    table = Table(title="highest scores", show_header=True)
    table.add_column("score", justify="right")
    table.add_column("verdict")
    table.add_column("image")
    for score, path, verdict in summary.worst:
        table.add_row(f"{score:.5g}", verdict, path)
    return table


@app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect score ./line_camera_dump\n\n"
        "  surfaceinspect score ./dump --output results.csv     (or .jsonl)\n\n"
        "  surfaceinspect score ./dump --json | jq 'select(.verdict==\"defect\")'\n\n" + EXIT_CODES_HELP
    )
)
@handle_errors
def score(
    images_dir: Annotated[Path, typer.Argument(help="Image file or folder (searched recursively).")],
    model: ModelOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write one record per image to FILE.csv or FILE.jsonl.")
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="csv | jsonl (default: from --output's extension).")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Write JSON Lines records to stdout (and nothing else to stdout).")
    ] = False,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score images with a trained model: a verdict per image, defect regions, a summary.

    Records carry path (relative to IMAGES_DIR), verdict (good/defect/error), score (raw),
    score_normalized (0..1, the threshold at 0.5), n_regions, largest_region_area and the
    largest region's bbox_x/bbox_y/bbox_width/bbox_height, width, height, error.
    Unreadable images are reported and skipped; they never stop the run.
    """
    from surfaceinspect import engine
    from surfaceinspect.records import RecordWriter

    if fmt is not None and fmt not in ("csv", "jsonl"):
        raise typer.BadParameter("--format must be csv or jsonl")
    reporter = _reporter(quiet)
    engine.require_input(images_dir)
    loaded = engine.load(model, device=device or "auto")
    reporter.info(
        f"model: {loaded.run_dir} ({loaded.detector.name}, threshold {loaded.calibration.image_threshold:.5g})"
    )
    writers = [w for w in (RecordWriter.open(output, fmt), RecordWriter.open(None, fmt, to_stdout=json_out)) if w]
    try:
        summary = engine.score_folder(
            loaded,
            images_dir,
            on_result=lambda r: [w.write(r.record) for w in writers],
            batch_size=batch_size,
            workers=workers,
            reporter=reporter,
        )
    finally:
        for writer in writers:
            writer.close()
    _print_summary(summary, quiet, json_out, output)
    raise typer.Exit(summary.exit_code())


def _print_summary(summary: Any, quiet: bool, json_out: bool, output: Path | None) -> None:
    console = err_console if json_out else out_console
    if quiet:
        return
    console.print(_summary_table(summary, f"{summary.total} images in {summary.seconds:.1f} s"))
    if summary.worst:
        console.print(_worst_table(summary))
    if output is not None:
        console.print(f"records: {output}")


# ---------------------------------------------------------------------------------------------
# heatmap


@app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect heatmap ./line_camera_dump --out heatmaps/\n\n"
        "  surfaceinspect heatmap ./dump --out heatmaps/ --save-maps   (also .npy maps)\n\n"
        "Open heatmaps/index.html in a browser: all overlays sorted by score.\n\n" + EXIT_CODES_HELP
    )
)
@handle_errors
def heatmap(
    images_dir: Annotated[Path, typer.Argument(help="Image file or folder (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays, maps and index.html.")],
    model: ModelOpt = None,
    save_maps: Annotated[
        bool, typer.Option("--save-maps", help="Also write <name>.npy: float32 HxW map, same scale as the score.")
    ] = False,
    output: Annotated[Path | None, typer.Option("--output", help="Also write records to FILE.csv/.jsonl.")] = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Render each image with its anomaly map, defect outlines and verdict; write index.html.

    Colours are on the calibrated scale (not per image): a good image stays calm, a defect
    glows, and outlines mark the regions above the pixel threshold.
    """
    from surfaceinspect import engine
    from surfaceinspect.records import RecordWriter

    reporter = _reporter(quiet)
    engine.require_input(images_dir)
    loaded = engine.load(model, device=device or "auto")
    reporter.info(f"model: {loaded.run_dir} ({loaded.detector.name})")
    writer = RecordWriter.open(output)
    try:
        summary, index = engine.heatmap_folder(
            loaded,
            images_dir,
            out,
            save_maps=save_maps,
            on_result=(lambda r: writer.write(r.record)) if writer else None,
            batch_size=batch_size,
            workers=workers,
            reporter=reporter,
        )
    finally:
        if writer:
            writer.close()
    _print_summary(summary, quiet, False, output)
    if not quiet:
        out_console.print(f"overlays: {out}   index: {index}")
    raise typer.Exit(summary.exit_code())


# ---------------------------------------------------------------------------------------------
# recalibrate


@app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect recalibrate ./good_after_relamp             (good images only)\n\n"
        "  surfaceinspect recalibrate ./labelled --labelled --mode f1   (good/ + defect subfolders)"
    )
)
@handle_errors
def recalibrate(
    folder: Annotated[Path, typer.Argument(help="Folder of good images (or, with --labelled, good/ + defect dirs).")],
    model: ModelOpt = None,
    labelled: Annotated[bool, typer.Option("--labelled", help="FOLDER has good/ and defect subfolders.")] = False,
    mode: Annotated[str | None, typer.Option("--mode", help="quantile | f1 | recall.")] = None,
    false_reject_rate: Annotated[
        float | None, typer.Option("--false-reject-rate", help="Quantile mode target.")
    ] = None,
    target_recall: Annotated[float | None, typer.Option("--target-recall", help="Recall mode target.")] = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Recompute a model's thresholds from new images without retraining (e.g. after a lighting change)."""
    from surfaceinspect import engine

    reporter = _reporter(quiet)
    engine.require_input(folder)
    loaded = engine.load(model, device=device or "auto")
    old = loaded.calibration.image_threshold
    cal = engine.recalibrate(
        loaded,
        folder,
        labelled=labelled,
        mode=mode,
        false_reject_rate=false_reject_rate,
        target_recall=target_recall,
        reporter=reporter,
    )
    reporter.info(
        f"[green]recalibrated[/green] {loaded.run_dir}: threshold {old:.5g} -> {cal.image_threshold:.5g} "
        f"({cal.mode}, {cal.n_good} good, {cal.n_defective} defective images)"
    )


# ---------------------------------------------------------------------------------------------
# benchmark


@app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect benchmark ../shared/data/mtd --method draem --method csflow --out bench/\n\n"
        "  surfaceinspect benchmark DATA --method csflow --model runs/csflow-... --out bench/  (no training)\n\n"
        "  surfaceinspect benchmark DATA -m draem --model RUN --set draem.smoothing_kernel=11 --out b/  (re-score)\n\n"
        "  surfaceinspect benchmark DATA -m csflow --seed 0 --seed 1 --seed 2 --out bench/   (mean and spread)\n\n"
        "  surfaceinspect benchmark DATA --method draem --quick --out /tmp/bench   (about a minute)"
    )
)
@handle_errors
def benchmark(
    datasets: Annotated[list[Path], typer.Argument(help="MVTec-layout dataset roots (train/good, test/...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.json, report.md and ROC plots.")],
    method: Annotated[
        list[str] | None, typer.Option("--method", "-m", help="Methods to compare (repeatable). [default: all]")
    ] = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Evaluate this trained run instead of training (one dataset).")
    ] = None,
    keep_models: Annotated[
        Path | None,
        typer.Option(
            "--keep-models",
            help="Keep the trained runs in DIR/<dataset>-<method> (usable with score, heatmap, --model).",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Few images and steps: checks the pipeline in about a minute.")
    ] = False,
    seed: Annotated[
        list[int] | None,
        typer.Option(
            "--seed",
            help="Train once per seed (repeatable: --seed 0 --seed 1 --seed 2); the report adds mean, std, "
            "min and max over the seeds. [default: the config's common.seed, once]",
        ),
    ] = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train, calibrate and evaluate methods on datasets: accuracy, speed and memory in one report.

    With --model RUN nothing is trained: the run is evaluated as it is, or, with --set on its
    inference settings (e.g. --set draem.smoothing_kernel=11), re-scored and recalibrated on its
    own held-out images, without changing the run's files.

    Accuracy: image AUROC/AP, F1 at the calibrated threshold and best F1, pixel AUROC and AUPRO
    (where masks exist), per defect type and overall. Cost: training time and images/s,
    inference images/s at batch 1 and batched, latency p50/p95, peak memory, device, threads.
    """
    from surfaceinspect.benchmark import BenchmarkOptions, run_benchmark
    from surfaceinspect.detectors import available_methods

    reporter = _reporter(quiet)
    options = BenchmarkOptions(
        datasets=datasets,
        methods=method or available_methods(),
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
        from surfaceinspect.benchmark import summary_table

        out_console.print(summary_table(report))
        out_console.print(f"report: {out / 'report.md'}  {out / 'report.json'}")


# ---------------------------------------------------------------------------------------------
# demo


@app.command()
@handle_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the generated data, models and outputs.")] = Path(
        "demo_output"
    ),
    method: Annotated[
        list[str] | None, typer.Option("--method", "-m", help="Methods to run (repeatable). [default: all]")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """End-to-end tour on a generated dataset: train, score, heatmaps (a few minutes on a CPU)."""
    from surfaceinspect.demo import run_demo
    from surfaceinspect.detectors import available_methods

    reporter = _reporter(quiet)
    lines = run_demo(out, method or available_methods(), reporter)
    for line in lines:
        out_console.print(line, highlight=False)


@app.command("profiles")
@handle_errors
def profiles() -> None:
    """List the named profiles (sample_configs/) usable with --profile."""
    from surfaceinspect.config import list_profiles

    for name, path in list_profiles().items():
        out_console.print(f"{name:24s} {path}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
