"""The ``surfaceinspect`` command line: thin wrappers over :mod:`surfaceinspect.engine`."""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand

import surfaceinspect
from surfaceinspect.detectors import available_methods
from surfaceinspect.errors import (
    EXIT_DRIFT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    SurfaceInspectError,
)
from surfaceinspect.ui import Part, plural, styled

EXIT_CODES_HELP = (
    "Exit codes: 0 all images good · 1 at least one defect (0 with --no-fail-on-defect) · 3 some images unreadable "
    "(no defect) · 2 usage, input, output, config or model error · 4 internal error (rerun with --debug) · "
    "5 drift detected (score and watch, only with --fail-on-drift) · 130 interrupted (Ctrl-C or SIGTERM)."
)

app = typer.Typer(
    name="surfaceinspect",
    help=(
        "Find surface defects with anomaly detection trained on good images only.\n\n"
        "Typical use:\n\n"
        "  surfaceinspect train --method draem ./good_images\n\n"
        "  surfaceinspect score ./line_camera_dump --output results.csv\n\n"
        "  surfaceinspect heatmap ./line_camera_dump --out heatmaps/\n\n"
        "-o is a FILE in score (--output) and a FOLDER elsewhere (--out).\n\n" + EXIT_CODES_HELP
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


def _print_error(message: str) -> None:
    """``error: message`` on stderr; the message is printed as it is (never parsed as markup)."""
    try:
        err_console.print(styled(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    except Exception:  # noqa: BLE001 - the exit code must survive a broken terminal
        sys.stderr.write(f"error: {message}\n")


def _fail(message: str, code: int) -> typer.Exit:
    _print_error(message)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """One clear line instead of a traceback (unless --debug), with the documented exit code.

    User mistakes (SurfaceInspectError, click usage errors, paths that cannot be written) exit 2;
    anything else is a bug and exits 4, never 0, 1 or 3, which a script would read as a verdict.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_interrupts():
                return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # usage errors (BadParameter ...): Typer prints them itself and exits 2
        except SurfaceInspectError as exc:
            if _state["debug"]:
                raise
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt as exc:
            by = " (SIGTERM)" if isinstance(exc, Terminated) else ""
            raise _fail(f"interrupted{by}", EXIT_INTERRUPTED) from None
        except MemoryError:
            raise _fail("out of memory; lower --batch-size or --image-size", EXIT_USAGE) from None
        except Exception as exc:
            if _state["debug"]:
                raise
            raise _internal_or_os_error(exc) from None

    return wrapper  # type: ignore[return-value]


class Terminated(KeyboardInterrupt):
    """SIGTERM during a batch command, raised like Ctrl-C so the same clean-up runs (records, gallery)."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While a command runs, SIGTERM interrupts it as Ctrl-C does (instead of killing it on the spot).

    A killed ``heatmap`` left no ``index.html`` and a killed ``score`` no word about its records;
    interrupted, they write the gallery and say where the records are, and exit 130. ``watch``
    overrides this: SIGTERM is how a service is stopped (:func:`_signals_set`). A handler someone
    else installed (an embedding program) is left alone.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def terminate(_signum: int, _frame: Any) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _internal_or_os_error(exc: Exception) -> typer.Exit:
    from surfaceinspect.outputs import os_error_message

    message = os_error_message(exc) if isinstance(exc, OSError) else None
    if message is not None:  # e.g. disk full or permission denied while writing: the user can fix it
        return _fail(message, EXIT_USAGE)
    return _fail(
        f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)",
        EXIT_INTERNAL,
    )


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, *_: Any, **__: Any) -> None:
    """Python warnings as one ``warning:`` line (with --debug: where they came from)."""
    where = f" ({category.__name__} at {filename}:{lineno})" if _state["debug"] else ""
    try:
        err_console.print(styled(("warning:", "yellow"), f" {message}{where}"), highlight=False)
    except Exception:  # noqa: BLE001 - a warning must never end the run
        sys.stderr.write(f"warning: {message}\n")


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
    warnings.showwarning = _show_warning


# ---------------------------------------------------------------------------------------------
# Shared options

MethodOpt = Annotated[
    str | None,
    typer.Option(
        "--method",
        "-m",
        help=f"Detector: auto, {', '.join(available_methods())}. auto measures which detector suits your images "
        "(see above). [default: auto, or the --config file's method]",
    ),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        "-p",
        help="Named profile from sample_configs/ (cpu, paper; texture: textured surfaces, small defects; "
        "long: DRAEM ensemble of 3 models, 3x the time; `surfaceinspect profiles` lists them) or a YAML path. "
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
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=0, help="CPU threads for torch (0 = all cores).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info, only warnings and errors.")]
RecordsOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        metavar="FILE",
        help="Write one record per image to FILE.csv or FILE.jsonl (-o is a file here, a folder in the other "
        "commands). An existing file is replaced only if it is an earlier records file, or with --force.",
    ),
]

RuntimeOpt = Annotated[
    str | None,
    typer.Option(
        "--runtime",
        metavar="auto|torch|onnx|openvino",
        help="auto: onnx when scoring on the CPU and the run has an export of its current weights (2-3x faster "
        "there), else torch; torch: the trained model; onnx: its export (written by `surfaceinspect export`, "
        "RUN/export-onnx/), run with onnxruntime on the CPU (--device is ignored); openvino: the same graph in "
        "OpenVINO (optional extra; only if export checked its parity). Same records, scores within the export's "
        "parity tolerance. --model may also be an export folder (then onnx). (default: auto)",
    ),
]


class RecordFormat(str, Enum):
    csv = "csv"
    jsonl = "jsonl"


FormatOpt = Annotated[
    RecordFormat | None,
    typer.Option("--format", help="Records format; must agree with FILE's extension. [default: from the extension]"),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="I/N",
        help="Only the images of shard I of N (I = 0 .. N-1), split by a hash of each image's path relative to "
        "the folder: N runs with I = 0 .. N-1 (a Slurm array, GNU parallel, ...) score every image exactly once, "
        "and their records concatenate into those of one unsharded run. The exit code covers this shard only.",
    ),
]


DriftWindowOpt = Annotated[
    int,
    typer.Option(
        "--drift-window",
        min=5,
        metavar="N",
        help="Check for drift every N good verdicts: are their scores still like the calibration's good scores "
        "(two-sided Mann-Whitney test, false alarm rate at most 0.001 per check)? A drift is a warning, in the "
        "summary and in the records' warnings.",
    ),
]
FailOnDriftOpt = Annotated[
    bool,
    typer.Option("--fail-on-drift", help="Exit 5 when drift was detected (the verdicts themselves are in doubt)."),
]


def _exit_code(summary: Any, fail_on_drift: bool, fail_on_defect: bool = True) -> int:
    """The verdict's exit code (1 for a defect only with ``fail_on_defect``), or 5 with --fail-on-drift when
    drift was detected (it overrides 0, 1 and 3)."""
    if fail_on_drift and summary.drift is not None and summary.drift.detected:
        return EXIT_DRIFT
    return int(summary.exit_code(fail_on_defect))


def _parse_shard(text: str | None) -> Any:
    from surfaceinspect.sharding import Shard

    return None if text is None else Shard.parse(text)


FailOnDefectOpt = Annotated[
    bool,
    typer.Option(
        "--fail-on-defect/--no-fail-on-defect",
        help="--no-fail-on-defect: exit 0, not 1, when images are defective (the verdicts are in the records and "
        "the summary), so `set -e` scripts go on to read them; unreadable images still exit 3.",
    ),
]

ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Replace existing outputs that surfaceinspect did not write (never the input images)."
    ),
]


METHOD_OPTIONS_PANEL = "Method options (every other setting: --set METHOD.KEY=VALUE)"


def _method_option_params() -> list[Any]:
    """Options for every field a method's config declares in ``cli_options`` (one per field name).

    Built by Typer from a generated signature, so they behave and print like the declared options.
    """
    from surfaceinspect.detectors import available_methods, get_config_class

    helps: dict[str, list[str]] = {}
    for method in available_methods():
        for name, text in get_config_class(method).cli_options.items():
            helps.setdefault(name, []).append(f"{method}: {text}")
    annotations = {
        name: Annotated[
            str | None,
            typer.Option(
                f"--{name.replace('_', '-')}", help="; ".join(texts) + ".", rich_help_panel=METHOD_OPTIONS_PANEL
            ),
        ]
        for name, texts in sorted(helps.items())
    }

    def method_options(**_: Any) -> None:
        """Placeholder whose signature Typer turns into options."""

    method_options.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a)
            for n, a in annotations.items()
        ]
    )
    method_options.__annotations__ = dict(annotations)
    helper = typer.Typer(add_completion=False)
    helper.command()(method_options)
    return list(typer.main.get_command(helper).params)


class MethodOptionsCommand(TyperCommand):
    """A command that also takes each method's own options, as its config declares them.

    The options come from ``MethodConfig.cli_options`` of every registered method, built when the
    command is parsed or its help is shown (so other commands never import the detectors). Their
    values reach the command as ``ctx.meta["method_options"]`` (field name -> value, given ones only).
    """

    _method_params: list[Any] | None = None

    def method_params(self) -> list[Any]:
        if self._method_params is None:
            self._method_params = _method_option_params()
        return self._method_params

    def get_params(self, ctx: typer.Context) -> list[Any]:
        params = super().get_params(ctx)
        return params[:-1] + self.method_params() + params[-1:]  # --help stays last

    def invoke(self, ctx: typer.Context) -> Any:
        given = {p.name: ctx.params.pop(p.name, None) for p in self.method_params() if p.name}
        ctx.meta["method_options"] = {k: v for k, v in given.items() if v is not None}
        return super().invoke(ctx)


def _reporter(quiet: bool):
    from surfaceinspect.ui import Reporter

    return Reporter(err_console, quiet=quiet)


# ---------------------------------------------------------------------------------------------
# train


@app.command(
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
        "Refused (exit 2): a labelled folder (good/ + defect folders, or an MVTec dataset root) as GOOD_DIR, "
        "and an --out that holds a model (unless --force) or other files (unless --force)."
    ),
    cls=MethodOptionsCommand,
)
@handle_errors
def train(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None, typer.Argument(help="Folder of defect-free images (searched recursively).", show_default=False)
    ] = None,
    method: MethodOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            metavar="SIZE",
            help="Network input: S (square), HxW (e.g. 128x512), or keep:L (long side L, the training images' "
            "aspect). With tiling: the tile size. Each side must suit the method (the error says which sizes do).",
        ),
    ] = None,
    batch_size: BatchOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Training epochs.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            help="Minutes: shorten the schedule to finish within this (with --method auto: the whole selection, "
            "default 30; 0 = no limit).",
        ),
    ] = None,
    device: DeviceOpt = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
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
    defects: Annotated[
        Path | None,
        typer.Option(
            "--defects",
            metavar="FOLDER",
            help="With --method auto: a FOLDER of a few real defect images; the candidates are ranked on them "
            "first (then on the synthetic anomalies). Never used for training.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="FOLDER",
            help="Run directory (a FOLDER) to write: new or empty. [default: a new one under the runs folder]",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the model in --out, or write into a non-empty --out.")
    ] = False,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue an interrupted run: its directory, or 'latest'.")
    ] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the effective config and exit.")] = False,
    quiet: QuietOpt = False,
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
    """
    from surfaceinspect import auto, engine, modeldir
    from surfaceinspect.config import parse_image_size, resolve_run_config

    reporter = _reporter(quiet)
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
            _print_selection(auto.resume_auto(run_dir, reporter=reporter, mark_latest=True), quiet)
            return
        result = engine.resume(run_dir, reporter=reporter, mark_latest=True)
    elif _wants_auto(method, config):
        _refuse_for_auto(profile, config, {"epochs": epochs, "lr": lr, **method_options})
        request = auto.AutoRequest({k: v for k, v in common_flags.items() if v is not None}, list(set_ or []))
        if print_config:
            sys.stdout.write(auto.describe(request))
            raise typer.Exit(EXIT_OK)
        if data_dir is None:
            raise ConfigError("give the folder of good images: surfaceinspect train ./good_images")
        engine.require_input(data_dir)
        selected = auto.train_auto(
            data_dir,
            request,
            reporter=reporter,
            run_dir=out,
            calibration_dir=calibration_dir,
            defects_dir=defects,
            force=force,
            mark_latest=True,
        )
        _print_selection(selected, quiet)
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
        if print_config:
            sys.stdout.write(run_config.to_yaml())
            raise typer.Exit(EXIT_OK)
        if data_dir is None:
            raise ConfigError("give the folder of good images: surfaceinspect train --method draem ./good_images")
        engine.require_input(data_dir)
        result = engine.train(
            data_dir,
            run_config,
            reporter=reporter,
            run_dir=out,
            calibration_dir=calibration_dir,
            force=force,
            mark_latest=True,
        )
    _print_trained(result, reporter)


def _print_trained(result: Any, reporter: Any) -> None:
    cal = result.calibration
    target = f", false-reject target {cal.target.get('false_reject_rate')}" if cal.mode == "quantile" else ""
    reporter.info(
        ("done", "green"),
        f" in {result.summary.get('total_seconds', 0):.0f} s — model: ",
        (str(result.run_dir), "bold"),
        f" (model id {result.model_id})",
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


def _print_selection(selected: Any, quiet: bool) -> None:
    """The candidate table, the operating points and the usual closing line of train."""
    from surfaceinspect.auto import selection_rich_table

    if not quiet:
        console = Console()  # sys.stdout as it is now (a test runner may have replaced it)
        for renderable in selection_rich_table(selected.selection):
            console.print(renderable)
    _print_trained(selected.train, _reporter(quiet))


def _refuse_with_resume(ctx: typer.Context, method_options: dict[str, str]) -> None:
    """``--resume`` continues a run as it was planned: any other training flag would be ignored, so refuse it."""
    allowed = {"resume", "quiet"}
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


# ---------------------------------------------------------------------------------------------
# score and heatmap: shared summary


def _summary_table(summary: Any, title: str) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("verdict")
    table.add_column("images", justify="right")
    table.add_row(Text("good", "green"), str(summary.n_good))
    table.add_row(Text("defect", "red"), str(summary.n_defect))
    table.add_row(Text("unreadable", "yellow"), str(summary.n_error))
    return table


def _worst_table(summary: Any) -> Table:
    from surfaceinspect.records import format_score  # the one score format (summary, watch, gallery)

    table = Table(title="highest scores", show_header=True)
    table.add_column("score", justify="right")
    table.add_column("verdict")
    table.add_column("image")
    for score, path, verdict in summary.worst:
        table.add_row(format_score(score), verdict, Text(path))  # file names are shown as they are
    return table


def _print_summary(summary: Any, quiet: bool, json_out: bool, outputs: list[Part], title: str | None = None) -> None:
    """The verdict counts, the highest scores, the unreadable files and where the outputs went."""
    console = err_console if json_out else out_console
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


def _open_records(output: Path | None, fmt: str | None, inputs: list[Path], force: bool, reporter: Any) -> Any:
    from surfaceinspect.records import RecordWriter

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


def _close_records(writers: list[Any], complete: bool, reporter: Any) -> None:
    """Close every records writer; after an incomplete run, say where its records are."""
    for writer in writers:
        kept = writer.close(complete)
        if kept is not None:
            reporter.warn(
                f"the run did not complete: its {writer.count} record(s) are in {kept}; {writer.target} "
                + ("is unchanged" if writer.replaced else "was not written")
            )


# ---------------------------------------------------------------------------------------------
# score


@app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect score ./line_camera_dump\n\n"
        "  surfaceinspect score ./dump --output results.csv     (or .jsonl)\n\n"
        "  surfaceinspect score ./dump --json | jq 'select(.verdict==\"defect\")'\n\n"
        "  surfaceinspect score ./dump --shard $SLURM_ARRAY_TASK_ID/8 --output scores-$SLURM_ARRAY_TASK_ID.jsonl\n\n"
        + EXIT_CODES_HELP
    )
)
@handle_errors
def score(
    images_dir: Annotated[Path, typer.Argument(help="Image file or folder (searched recursively).")],
    model: ModelOpt = None,
    output: RecordsOpt = None,
    fmt: FormatOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Write JSON Lines records to stdout (and nothing else to stdout).")
    ] = False,
    force: ForceOpt = False,
    fail_on_defect: FailOnDefectOpt = True,
    shard: ShardOpt = None,
    runtime: RuntimeOpt = None,
    drift_window: DriftWindowOpt = 50,
    fail_on_drift: FailOnDriftOpt = False,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score images with a trained model: a verdict per image, defect regions, a summary.

    One record per image: path (relative to IMAGES_DIR), verdict (good/defect/error), score (the
    raw anomaly score: defect if score >= threshold), regions and their bounding box, image size,
    error, and for traceability model_id, threshold, runtime, time and warnings (what each field
    means: docs/records.md). In CSV, text starting with = + - @ gets a leading ' (spreadsheets
    would run it as a formula). Unreadable images are reported and skipped; they never stop the run.
    """
    from surfaceinspect import engine
    from surfaceinspect.records import RecordWriter

    reporter = _reporter(quiet)
    selected = _parse_shard(shard)
    engine.require_input(images_dir)
    # Outputs are checked (and opened) before the model loads: a refused path fails in a second.
    fmt_name = fmt.value if fmt is not None else None
    writers = [_open_records(output, fmt_name, [images_dir], force, reporter)]
    if json_out:
        writers.append(RecordWriter.open(None, fmt_name, to_stdout=True))
    active = [w for w in writers if w is not None]
    complete = False
    try:
        loaded = engine.load(model, device=device or "auto", threads=threads or 0, runtime=runtime)
        _report_model(reporter, loaded)
        summary = engine.score_folder(
            loaded,
            images_dir,
            on_result=lambda r: [w.write(r.record) for w in active],
            batch_size=batch_size,
            workers=workers,
            reporter=reporter,
            shard=selected,
            drift_window=drift_window,
        )
        complete = True
    finally:
        _close_records(active, complete, reporter)
    _print_summary(summary, quiet, json_out, [f"records: {output}"] if output is not None else [])
    raise typer.Exit(_exit_code(summary, fail_on_drift, fail_on_defect))


def _runtime_note(loaded: Any) -> str:
    """' [onnx: FOLDER]' or ' [torch on cpu]': the operator sees which runtime scores."""
    export_dir = getattr(loaded.detector, "export_dir", None)
    if export_dir is not None:
        return f" [{loaded.detector.runtime}: {export_dir}]"
    return f" [torch on {loaded.detector.device}]"


def _report_model(reporter: Any, loaded: Any, extra: str = "") -> None:
    """The model line (folder, method, model id, threshold, runtime), then its notes as warnings."""
    threshold = f", threshold {loaded.calibration.image_threshold:.5g}" if loaded.calibration is not None else ""
    reporter.info(
        f"model: {loaded.run_dir} ({loaded.detector.name}, model id {loaded.model_id}{threshold})"
        + _runtime_note(loaded)
        + extra
    )
    for note in loaded.notes:
        reporter.warn(note)


# ---------------------------------------------------------------------------------------------
# heatmap


@app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect heatmap ./line_camera_dump --out heatmaps/\n\n"
        "  surfaceinspect heatmap ./dump --out heatmaps/ --save-maps   (also .npy maps)\n\n"
        "  surfaceinspect heatmap ./dump --out ./dump/heatmaps/       (a subfolder: later runs skip it)\n\n"
        "  surfaceinspect heatmap ./dump --shard 0/4 --out heatmaps/shard-0   (one folder per shard)\n\n"
        "Open heatmaps/index.html in a browser: all overlays sorted by score, the unreadable files, the "
        "model and its thresholds.\n\n" + EXIT_CODES_HELP
    )
)
@handle_errors
def heatmap(
    images_dir: Annotated[Path, typer.Argument(help="Image file or folder (searched recursively).")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="FOLDER",
            help="FOLDER for overlays, maps and index.html: new, empty, or an earlier heatmap output. Never the "
            "input folder; a subfolder of it is marked so that later runs skip it.",
        ),
    ],
    model: ModelOpt = None,
    save_maps: Annotated[
        bool, typer.Option("--save-maps", help="Also write <name>.npy: float32 HxW map, same scale as the score.")
    ] = False,
    opacity: Annotated[
        float | None,
        typer.Option(
            "--opacity",
            min=0.0,
            max=1.0,
            help="Heat opacity at the threshold (0 = outlines only; it rises to 1.4x this on the hottest pixels, "
            "so the defect stays visible). [default: 0.4]",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", metavar="FILE", help="Also write records to FILE.csv/.jsonl (see score)."),
    ] = None,
    force: ForceOpt = False,
    fail_on_defect: FailOnDefectOpt = True,
    shard: ShardOpt = None,
    runtime: RuntimeOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Render each image with its anomaly map, defect outlines and verdict; write index.html.

    Colours are on the calibrated scale (not per image): a good image stays calm, a defect
    glows, and outlines mark the regions above the pixel threshold.
    """
    from surfaceinspect import engine
    from surfaceinspect.outputs import lock_output, prepare_output_dir

    reporter = _reporter(quiet)
    selected = _parse_shard(shard)
    engine.require_input(images_dir)
    # Fail before the model loads, on a refused or locked --out (the engine checks and locks it again).
    prepare_output_dir(out, [images_dir], force=force, refuse_links=True)
    lock_output(out, "--out", "folder").release()
    writer = _open_records(output, None, [images_dir], force, reporter)
    complete = False
    try:
        loaded = engine.load(model, device=device or "auto", threads=threads or 0, runtime=runtime)
        _report_model(reporter, loaded)
        summary, index = engine.heatmap_folder(
            loaded,
            images_dir,
            out,
            save_maps=save_maps,
            on_result=(lambda r: writer.write(r.record)) if writer else None,
            batch_size=batch_size,
            workers=workers,
            reporter=reporter,
            force=force,
            opacity=opacity,
            shard=selected,
        )
        complete = True
    finally:
        _close_records([writer] if writer else [], complete, reporter)
    outputs: list[Part] = [f"overlays: {out}   index: {index}"]
    _print_summary(summary, quiet, False, ([f"records: {output}"] if output is not None else []) + outputs)
    raise typer.Exit(summary.exit_code(fail_on_defect))


# ---------------------------------------------------------------------------------------------
# export


@app.command(
    "export",
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect export                                 (latest run -> RUN/export-onnx/)\n\n"
        "  surfaceinspect export --model RUN --out line3_model/\n\n"
        "  surfaceinspect export --images ./good_samples          (parity on these instead)\n\n"
        "  surfaceinspect score ./dump --runtime onnx             (score with the export)\n\n"
        "The folder holds model.onnx (image (B,3,H,W) float32 RGB in [0,1] -> score (B,), map (B,H,W), raw units), "
        "calibration.json and export.json (input contract, thresholds, parity result). Refused (exit 2, nothing "
        "written) if the exported graph disagrees with the torch model on the parity images."
    ),
)
@handle_errors
def export(
    model: ModelOpt = None,
    fmt: Annotated[str, typer.Option("--format", metavar="onnx", help="Artefact format (onnx).")] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="FOLDER",
            help="New or empty FOLDER, or an earlier export (default: RUN/export-onnx, which --runtime onnx uses).",
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            metavar="DIR",
            help="Images for the parity check (default: the run's held-out calibration images).",
        ),
    ] = None,
    n_images: Annotated[int, typer.Option("--parity-images", min=1, help="How many parity images (at most).")] = 8,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Export a trained model to ONNX, after checking that the export scores like it.

    The graph contains the whole inference (DRAEM's networks, softmax and smoothing; CS-Flow's
    backbone, flow and map post-processing) with a dynamic batch axis. Parity: scores and maps
    of the export agree with the torch model within 0.1% of max(|value|, threshold) on the
    parity images, and every verdict is identical (otherwise nothing is written). With OpenVINO
    installed, its parity is checked too and recorded for --runtime openvino. Tiled models export
    the per-tile graph; cutting tiles and blending their maps happen outside it (export.json says how).
    """
    from surfaceinspect import engine
    from surfaceinspect.export import export_run

    reporter = _reporter(quiet)
    loaded = engine.load(model, device="cpu", threads=threads or 0, runtime="torch")
    _report_model(reporter, loaded, "; exporting, then checking parity...")
    result = export_run(
        loaded.run_dir,
        loaded.detector,
        loaded.calibration,
        loaded.metadata,
        out,
        fmt=fmt,
        images=images,
        n_images=n_images,
        force=force,
    )
    reporter.info(("exported", "green"), f" {result.out_dir}: parity on {result.parity.describe()}")
    for runtime, parity in result.parity_other.items():
        reporter.info(
            f"  {runtime}: " + ("parity passed" if parity["passed"] else parity.get("reason", "parity failed"))
        )


# ---------------------------------------------------------------------------------------------
# recalibrate


@app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect recalibrate ./good_after_relamp             (good images only)\n\n"
        "  surfaceinspect recalibrate ./labelled --labelled --mode f1   (good/ + defect subfolders)\n\n"
        "  surfaceinspect recalibrate --undo                          (restore the previous calibration)\n\n"
        "Refused (exit 2, nothing changed): fewer good images than training uses for calibration "
        "(common.calibration.min_images), a labelled folder without --labelled, and good images whose median "
        "scores at or above the current threshold (unless --force). The replaced calibration "
        "is kept as calibration.<time>.json in the run directory."
    )
)
@handle_errors
def recalibrate(
    folder: Annotated[
        Path | None,
        typer.Argument(help="Folder of good images (or, with --labelled, good/ + defect dirs).", show_default=False),
    ] = None,
    model: ModelOpt = None,
    labelled: Annotated[bool, typer.Option("--labelled", help="FOLDER has good/ and defect subfolders.")] = False,
    mode: Annotated[str | None, typer.Option("--mode", help="quantile | f1 | recall.")] = None,
    false_reject_rate: Annotated[
        float | None, typer.Option("--false-reject-rate", help="Quantile mode target.")
    ] = None,
    target_recall: Annotated[float | None, typer.Option("--target-recall", help="Recall mode target.")] = None,
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
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Recompute a model's thresholds from new images without retraining (e.g. after a lighting change)."""
    from surfaceinspect import engine

    reporter = _reporter(quiet)
    if undo:
        if folder is not None:
            raise ConfigError("--undo takes no FOLDER: surfaceinspect recalibrate --undo [--model RUN]")
        change = engine.undo_recalibration(model)
        reporter.info(("restored", "green"), f" {change.backup.name if change.backup else '?'}: ")
        _print_thresholds(reporter, change)
        return
    if folder is None:
        raise ConfigError("give a folder of good images: surfaceinspect recalibrate ./good_images")
    engine.require_input(folder)
    # need_calibration=False: a missing, damaged or foreign calibration is what recalibrate replaces
    loaded = engine.load(model, device=device or "auto", threads=threads or 0, need_calibration=False)
    _report_model(reporter, loaded)
    change = engine.recalibrate(
        loaded,
        folder,
        labelled=labelled,
        mode=mode,
        false_reject_rate=false_reject_rate,
        target_recall=target_recall,
        batch_size=batch_size,
        workers=workers,
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
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", metavar="FOLDER", help="FOLDER for report.json, report.md and ROC plots (new or empty)."
        ),
    ],
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            "-m",
            help="Methods to compare (repeatable): auto (the candidate table adds each candidate's test AUROC and "
            "the rank agreement), draem, csflow. [default: auto]",
        ),
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
            metavar="FOLDER",
            help="Keep the trained runs in FOLDER/<dataset>-<method> (new or empty; usable with score, heatmap, "
            "--model).",
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
    force: ForceOpt = False,
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
    from surfaceinspect.outputs import prepare_output_dir

    reporter = _reporter(quiet)
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
        from surfaceinspect.benchmark import summary_table

        out_console.print(summary_table(report))
        from surfaceinspect.auto import selection_rich_table

        for entry in report["entries"]:
            if entry.get("selection"):
                out_console.print(f"{entry['dataset']}, seed {entry.get('seed')}:", highlight=False)
                for renderable in selection_rich_table(entry["selection"]):
                    out_console.print(renderable)
        out_console.print(styled(f"report: {out / 'report.md'}  {out / 'report.json'}"), highlight=False)


# ---------------------------------------------------------------------------------------------
# demo


@app.command()
@handle_errors
def demo(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="FOLDER",
            help="FOLDER for the generated data, models and outputs (new, or an earlier demo output).",
        ),
    ] = Path("demo_output"),
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
        out_console.print(styled(line), highlight=False)


@app.command("profiles")
@handle_errors
def profiles() -> None:
    """List the shipped profiles as the --method/--profile pairs that select them."""
    from surfaceinspect.config import list_profiles
    from surfaceinspect.detectors import available_methods

    table = Table(title="use: surfaceinspect train --method METHOD --profile PROFILE", show_header=True)
    for column in ("--method", "--profile", "file"):
        table.add_column(column)
    shipped = list_profiles()
    for method in available_methods():
        for name, path in shipped.items():
            if name.startswith(method + "-"):
                table.add_row(Text(method), Text(name[len(method) + 1 :]), Text(str(path)))
    out_console.print(table)


# ---------------------------------------------------------------------------------------------
# watch


@app.command(
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
@handle_errors
def watch(
    folder: Annotated[Path, typer.Argument(help="Folder the images are written into (watched recursively).")],
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
    model: ModelOpt = None,
    fmt: FormatOpt = None,
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
            metavar="FOLDER",
            help="Copy each defective image to FOLDER/<relative path>. May be a subfolder of the watched folder "
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
    force: ForceOpt = False,
    drift_window: DriftWindowOpt = 50,
    fail_on_drift: FailOnDriftOpt = False,
    fail_on_defect: FailOnDefectOpt = True,
    batch_size: BatchOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score each new image written into FOLDER, as soon as it is complete; append its record to --output.

    Files are judged complete when their size and time stamp stop changing (--settle), or when
    they are renamed into place (write .name.png.tmp or name.png.part, then rename). Unreadable
    files get an error record and never stop the watch. Runs until SIGTERM (a clean stop, exit 0),
    Ctrl-C (exit 130), --stop-after or --idle-timeout; the summary covers the images of this session.
    """
    from surfaceinspect import engine
    from surfaceinspect.watch import WatchOptions, check_outputs, watch_folder

    reporter = _reporter(quiet)
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
        loaded = engine.load(model, device=device or "auto", threads=threads or 0)
        options.batch_size = batch_size or loaded.detector.run_config.common.batch_size
        _report_model(reporter, loaded)
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
    _print_summary(summary, quiet, False, extra, title)
    if result.stopped_by == "interrupted":
        raise _fail("interrupted; the records written are complete", EXIT_INTERRUPTED)
    if result.stopped_by == "terminated":
        raise typer.Exit(EXIT_OK)  # a requested stop ends a service cleanly, whatever it saw
    raise typer.Exit(_exit_code(summary, fail_on_drift, fail_on_defect))


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


def _reflow_help(doc: str) -> str:
    """A docstring as help text whose paragraphs rewrap to the terminal.

    Rich keeps a docstring's single line breaks, which splits sentences at the source's line length;
    paragraphs are joined into one line each, except lists and examples (lines that start with a space,
    ``- ``, ``* `` or ``$ ``), which keep their lines.
    """
    paragraphs = []
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "- ", "* ", "$ ")) for line in lines):
            paragraphs.append(paragraph)
        else:
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


for _command in app.registered_commands:
    if _command.help is None and _command.callback is not None and _command.callback.__doc__:
        _command.help = _reflow_help(_command.callback.__doc__)


def main() -> None:
    """Console-script entry point: whatever happens, a bug exits 4, never 0, 1 or 3."""
    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _print_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # the last line of defence for the exit code
        if _state["debug"]:
            raise
        _print_error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)")
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":  # pragma: no cover
    main()
