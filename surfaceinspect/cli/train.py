"""``surfaceinspect train``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from surfaceinspect import cli
from surfaceinspect.cli import common
from surfaceinspect.errors import EXIT_OK, ConfigError
from surfaceinspect.ui import plural


@cli.app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect train ./good_images                        (method auto: measured choice)\n\n"
        "  surfaceinspect train ./good_images --defects ./some_real_defects   (rank on real defects first)\n\n"
        "  surfaceinspect train --method draem ./good_images\n\n"
        "  surfaceinspect train -m csflow ./good_images --profile cpu --time-budget 20\n\n"
        "  surfaceinspect train -m draem ./good --set draem.anomaly_source=~/dtd/images\n\n"
        "  surfaceinspect train -m draem ./good --print-config      (show the effective config)\n\n"
        "  surfaceinspect train --resume latest                     (continue an interrupted run)\n\n"
        "  surfaceinspect train -m draem ./strips --image-size keep:512    (keep the images' aspect)\n\n"
        "  surfaceinspect train -m draem ./strips --set common.tiling.enabled=true   (tiles at full resolution)\n\n"
        "  surfaceinspect train -m draem ./good --no-export         (skip the ONNX export at the end)\n\n"
        "Refused (exit 2): a labelled folder (good/ + defect folders, or an MVTec dataset root) as GOOD_DIR, "
        "and an --out that holds a model (unless --force) or other files (unless --force)."
    ),
    cls=common.MethodOptionsCommand,
)
@common.handle_errors
def train(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None,
        typer.Argument(
            metavar="GOOD_DIR", help="Folder of defect-free images (searched recursively).", show_default=False
        ),
    ] = None,
    method: common.MethodOpt = None,
    profile: common.ProfileOpt = None,
    config: common.ConfigOpt = None,
    set_: common.SetOpt = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            metavar="SIZE",
            help="Network input: S (square), HxW (e.g. 128x512), or keep:L (long side L, the training images' "
            "aspect). With tiling: the tile size. Each side must suit the method (the error says which sizes do).",
        ),
    ] = None,
    batch_size: common.BatchOpt = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", metavar="N", help="Training epochs.", show_default="the profile's")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", metavar="RATE", help="Learning rate.", show_default="the profile's")
    ] = None,
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            metavar="MINUTES",
            help="Shorten the schedule to finish within this (with --method auto: the whole selection, "
            "default 30; 0 = no limit).",
            show_default="the profile's",
        ),
    ] = None,
    device: common.DeviceOpt = None,
    seed: Annotated[int | None, typer.Option("--seed", metavar="N", help="Random seed.", show_default="0")] = None,
    workers: common.WorkersOpt = None,
    threads: common.ThreadsOpt = None,
    calibration_fraction: Annotated[
        float | None,
        typer.Option(
            "--calibration-fraction",
            metavar="FRACTION",
            help="Share of good images kept for calibration.",
            show_default="0.1",
        ),
    ] = None,
    false_reject_rate: Annotated[float | None, common.false_reject_rate_option("0.01")] = None,
    calibration_dir: Annotated[
        Path | None,
        typer.Option(
            "--calibration-dir",
            metavar="DIR",
            help="Labelled folder (good/ + defect subfolders) to calibrate on instead.",
        ),
    ] = None,
    calibration_mode: Annotated[str | None, common.calibration_mode_option("--calibration-dir", "quantile")] = None,
    defects: Annotated[
        Path | None,
        typer.Option(
            "--defects",
            metavar="DIR",
            help="With --method auto: a DIR of a few real defect images; the candidates are ranked on them "
            "first (then on the synthetic anomalies). Never used for training.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        common.out_option(
            "Run directory (a DIR) to write: new or empty.", show_default="a new one under the runs folder"
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the model in --out, or write into a non-empty --out.")
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option("--resume", metavar="RUN|latest", help="Continue an interrupted run: its directory, or 'latest'."),
    ] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the effective config and exit.")] = False,
    no_export: Annotated[
        bool,
        typer.Option(
            "--no-export",
            help="Skip the ONNX export at the end (RUN/export-onnx; write it later with `surfaceinspect export`).",
        ),
    ] = False,
    quiet: common.QuietOpt = False,
) -> None:
    """Train a detector on a folder of good images, calibrate its threshold, save the model.

    With --method auto (the default) the detector is chosen by measurement on your images: every
    candidate (both methods' cpu and texture profiles, plus aspect-keeping variants for images far
    from square) trains its first steps, is scored on held-out good images and on synthetic
    defects made from them (or on real ones given with --defects), and the best continues to the
    end of its schedule within --time-budget (default 30 minutes). train prints the table of
    candidates and the expected catch rate at a few false-reject rates; the model keeps both.

    A share of the images (--calibration-fraction, at least common.calibration.min_images) is held
    out to set the decision threshold for --false-reject-rate. The run directory (weights,
    metadata.json, calibration.json) becomes the default model of `score` and `heatmap`, wherever
    --out puts it.

    Training ends with the export of `surfaceinspect export` (RUN/export-onnx, written only if it
    scores like the torch model), which `score`, `heatmap` and `watch` run with ONNX Runtime on the
    CPU; --no-export skips it. A refused export leaves the model scoring with torch, with a warning.
    """
    from surfaceinspect import engine
    from surfaceinspect.config import parse_image_size
    from surfaceinspect.profiles import resolve_run_config
    from surfaceinspect.storage import modeldir
    from surfaceinspect.workflows import auto

    if not print_config:
        common.require_full_install()
    reporter = common.make_reporter(quiet)
    export_threads = None if no_export else threads or 0  # torch threads of the closing export; None: none
    method_options: dict[str, str] = ctx.meta.get("method_options", {})
    common_flags = {
        "image_size": parse_image_size(image_size) if image_size is not None else None,
        "batch_size": batch_size,
        "device": device,
        "seed": seed,
        "workers": workers,
        "threads": threads,
        "time_budget_min": time_budget,
        "calibration.fraction": calibration_fraction,
        "calibration.false_reject_rate": false_reject_rate,
        "calibration.mode": calibration_mode,
    }
    if resume is not None:
        _refuse_with_resume(ctx, method_options)
        run_dir = modeldir.find_resumable() if resume == "latest" else Path(resume)
        if auto.is_auto_run(run_dir):
            _print_selection(auto.resume_auto(run_dir, reporter=reporter, mark_latest=True), quiet, export_threads)
            return
        result = engine.resume(run_dir, reporter=reporter, mark_latest=True)
    elif _wants_auto(method, config):
        _refuse_for_auto(profile, config, {"epochs": epochs, "lr": lr, **method_options})
        request = auto.AutoRequest({k: v for k, v in common_flags.items() if v is not None}, list(set_ or []))
        good_dir = _config_or_data(print_config, lambda: auto.describe(request), data_dir, "train ./good_images")
        selected = auto.train_auto(
            good_dir,
            request,
            reporter=reporter,
            run_dir=out,
            calibration_dir=calibration_dir,
            defects_dir=defects,
            force=force,
            mark_latest=True,
        )
        _print_selection(selected, quiet, export_threads)
        return
    else:
        if defects is not None:
            raise ConfigError("--defects ranks the candidates of --method auto; drop it, or use --method auto")
        run_config = resolve_run_config(
            method=method,
            profile=profile,
            config_file=config,
            common_flags=common_flags,
            method_flags={"epochs": epochs, "lr": lr, **method_options},
            sets=set_ or [],
        )
        good_dir = _config_or_data(print_config, run_config.to_yaml, data_dir, "train --method draem ./good_images")
        result = engine.train(
            good_dir,
            run_config,
            reporter=reporter,
            run_dir=out,
            calibration_dir=calibration_dir,
            force=force,
            mark_latest=True,
        )
    _print_trained(result, reporter, _export_run(result, reporter, export_threads))


def _config_or_data(print_config: bool, config_text: Any, data_dir: Path | None, example: str) -> Path:
    """``--print-config``: print ``config_text()`` and exit; otherwise the checked folder of good images."""
    from surfaceinspect import engine

    if print_config:
        sys.stdout.write(config_text())
        raise typer.Exit(EXIT_OK)
    if data_dir is None:
        raise ConfigError(f"give the folder of good images: surfaceinspect {example}")
    engine.require_input(data_dir)
    return data_dir


def _export_run(result: Any, reporter: Any, threads: int | None) -> str:
    """Export the trained run to RUN/export-onnx (``threads`` None: ``--no-export``); returns the run's model id."""
    if threads is None:
        return str(result.model_id)
    from surfaceinspect.deploy.export import export_after_training

    return export_after_training(result.run_dir, reporter, threads) or str(result.model_id)


def _print_trained(result: Any, reporter: Any, model_id: str) -> None:
    cal = result.calibration
    target = f", false-reject target {cal.target.get('false_reject_rate')}" if cal.mode == "quantile" else ""
    reporter.info(
        ("done", "green"),
        f" in {result.summary.get('total_seconds', 0):.0f} s — model: ",
        (str(result.run_dir), "bold"),
        f" (model id {model_id})",
        f"\n  threshold {cal.image_threshold:.5g} ({cal.mode}, {plural(cal.n_good, 'good calibration image')}{target})",
    )


def _wants_auto(method: str | None, config: Path | None) -> bool:
    """``--method auto``, or no method at all (neither the flag nor the ``--config`` file names one)."""
    if method is not None:
        return method == "auto"
    if config is None:
        return True
    from surfaceinspect.config import load_yaml_file

    return load_yaml_file(config).get("method", "auto") == "auto"


def _refuse_for_auto(profile: str | None, config: Path | None, method_flags: dict[str, Any]) -> None:
    """Flags that belong to one method's configuration cannot apply to every candidate of auto."""
    given = [f"--{k.replace('_', '-')}" for k, v in method_flags.items() if v is not None]
    given += ["--profile"] if profile is not None else []
    given += ["--config"] if config is not None else []
    if given:
        raise ConfigError(
            f"{', '.join(given)} configure one method, but --method auto trains several candidates; pick the "
            "method with --method draem|csflow, or set common settings with --set common.KEY=VALUE"
        )


def _print_selection(selected: Any, quiet: bool, export_threads: int | None) -> None:
    """The candidate table, the operating points, the export (unless ``export_threads`` is None), the closing line."""
    from surfaceinspect.workflows.selection import selection_rich_table

    if not quiet:
        console = Console()  # sys.stdout as it is now (a test runner may have replaced it)
        for renderable in selection_rich_table(selected.selection):
            console.print(renderable)
    reporter = common.make_reporter(quiet)
    _print_trained(selected.train, reporter, _export_run(selected.train, reporter, export_threads))


def _refuse_with_resume(ctx: typer.Context, method_options: dict[str, str]) -> None:
    """``--resume`` continues a run as it was planned: any other training flag would be ignored, so refuse it."""
    allowed = {"resume", "quiet", "no_export"}
    given = [
        name
        for name, value in ctx.params.items()
        if name not in allowed and getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
    ]
    given += list(method_options)
    if given:
        flags = ", ".join(f"--{n.replace('_', '-')}" if n != "data_dir" else "GOOD_DIR" for n in given)
        raise ConfigError(
            f"--resume continues the run with the settings, data and calibration folder it was started with; "
            f"{flags} cannot change them: drop {flags}, or start a new run"
        )
