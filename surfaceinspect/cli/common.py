"""What every command shares: the shared options, the command classes whose help names the installed
methods and profiles, the summary tables of score and heatmap; error handling and exit codes live in
:mod:`.failures` (re-exported here)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer
from typer.core import TyperCommand, TyperGroup

try:  # Typer >= 0.2x carries its own click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older Typer uses click itself
    from click.exceptions import UsageError  # type: ignore[no-redef]

from surfaceinspect import cli
from surfaceinspect.cli.failures import (  # re-exported: the commands reach them as common.NAME
    EXIT_CODES_HELP as EXIT_CODES_HELP,
    F,
    Terminated as Terminated,
    _usage_error,
    fail as fail,
    handle_errors as handle_errors,
    print_error as print_error,
    require_full_install as require_full_install,
    run_state as run_state,
    show_warning as show_warning,
    stdout_closed as stdout_closed,
    training_install_hint as training_install_hint,
)
from surfaceinspect.cli.reporting import report_model
from surfaceinspect.detectors import available_methods
from surfaceinspect.errors import (
    EXIT_DRIFT,
    ConfigError,
)


class Group(TyperGroup):
    """The ``surfaceinspect`` command group: argument errors in one line, like the tool's own errors.

    Typer draws click's usage errors (unknown option, missing argument, bad value) as a boxed panel
    under the usage; a script's log and an operator read one ``error:`` line plus where to get help.
    The exit code stays click's (2).
    """

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except UsageError as exc:
            raise _usage_error(exc) from None

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise _usage_error(exc) from None


# One name per concept in every command: the good images are GOOD_DIR (train, recalibrate), the images
# to judge are IMAGES (score, heatmap), a folder written is --out DIR, a trained model --model RUN.
ImagesArg = Annotated[
    Path, typer.Argument(metavar="IMAGES", help="Image file or folder (searched recursively).", show_default=False)
]


def out_option(help_text: str, **extra: Any) -> Any:
    """``--out``/``-o``: the folder a command writes (``-o`` is a FILE only in score, ``--output``)."""
    return typer.Option("--out", "-o", metavar="DIR", help=help_text, **extra)


def old_spelling(value: Any, name: str, old_value: Any, old_name: str, default: Any = None) -> Any:
    """The value of an option given by its name or by its old one (hidden, kept so that scripts keep working)."""
    if old_value is None:
        return value
    if value != default and value != old_value:
        raise ConfigError(f"{old_name} is the old spelling of {name}: give one of them")
    return old_value


# Option types in words: every option names its value (N, DIR, FILE, RATE ...) and flags name none.
# Options whose default comes from elsewhere (the profile, the model) stay None ("not given", so they
# do not override a --config file or the model's setting); their help shows where the default comes from.
MethodOpt = Annotated[
    str | None,
    typer.Option(
        "--method",
        "-m",
        metavar="METHOD",
        help="Detector: auto, {methods}. auto measures which detector suits your images (see above).",
        show_default="auto, or the --config file's method",
    ),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        "-p",
        metavar="PROFILE",
        help="Named profile (installed: {profiles}; `surfaceinspect profiles` says what each is for) or a YAML FILE.",
        show_default="paper with CUDA, cpu without",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", metavar="FILE", help="YAML config; overrides the profile, flags override it."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override any setting: --set draem.epochs=20 --set common.seed=1 (repeatable).",
    ),
]
ModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model", metavar="RUN", help="Run directory written by train.", show_default="the latest trained model"
    ),
]
DEVICE_METAVAR = "auto|cpu|cuda[:N]"


def _batch_option(default: str) -> Any:
    return typer.Option("--batch-size", "-b", min=1, metavar="N", help="Images per batch.", show_default=default)


def _workers_option(default: str) -> Any:
    return typer.Option(
        "--workers",
        min=0,
        metavar="N",
        help=("Image-reading threads (0 = the main thread); DRAEM training also synthesises anomalies in N processes."),
        show_default=default,
    )


def _threads_option(default: str | bool) -> Any:
    return typer.Option(
        "--threads",
        min=0,
        metavar="N",
        help="CPU threads of the network (torch or ONNX Runtime; 0 = all cores).",
        show_default=default,
    )


def _device_option(default: str | bool) -> Any:
    return typer.Option("--device", metavar=DEVICE_METAVAR, help="Where to run the network.", show_default=default)


def calibration_mode_option(labels: str, default: str) -> Any:
    """``--calibration-mode`` (train, recalibrate); ``labels``: the option giving the labelled images f1/recall need."""
    return typer.Option(
        "--calibration-mode",
        metavar="quantile|f1|recall",
        help=f"How to set the threshold (f1/recall need {labels}).",
        show_default=default,
    )


def false_reject_rate_option(default: str) -> Any:
    """``--false-reject-rate`` (train, recalibrate): the quantile mode's target."""
    return typer.Option(
        "--false-reject-rate",
        metavar="RATE",
        help="Target share of good images flagged defective (quantile mode).",
        show_default=default,
    )


# As train and benchmark take them: None leaves the profile's (or the --config file's) setting.
BatchOpt = Annotated[int | None, _batch_option("the profile's")]
WorkersOpt = Annotated[int | None, _workers_option("2, or the --config file's")]
ThreadsOpt = Annotated[int | None, _threads_option("0, or the --config file's")]
DeviceOpt = Annotated[str | None, _device_option("auto, or the --config file's")]
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
    str,
    typer.Option(
        "--runtime",
        metavar="auto|torch|onnx|openvino",
        help="auto: onnx when scoring on the CPU and the run has an export of its current weights (2-3x faster "
        "there), else torch; torch: the trained model; onnx: its export (written by `surfaceinspect export`, "
        "RUN/export-onnx/), run with onnxruntime on the CPU (--device is ignored); openvino: the same graph in "
        "OpenVINO (optional extra; only if export checked its parity). Same records, scores within the export's "
        "parity tolerance. --model may also be an export folder (then onnx).",
    ),
]


class RecordFormat(str, Enum):
    csv = "csv"
    jsonl = "jsonl"


FormatOpt = Annotated[
    RecordFormat | None,
    typer.Option(
        "--format",
        metavar="csv|jsonl",
        help="Records format; must agree with FILE's extension.",
        show_default="from the extension",
    ),
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


def verdict_exit_code(summary: Any, fail_on_drift: bool, fail_on_defect: bool = True) -> int:
    """The verdict's exit code (1 for a defect only with ``fail_on_defect``), or 5 with --fail-on-drift when
    drift was detected (it overrides 0, 1 and 3)."""
    if fail_on_drift and summary.drift is not None and summary.drift.detected:
        return EXIT_DRIFT
    return int(summary.exit_code(fail_on_defect))


def parse_shard(text: str | None) -> Any:
    from surfaceinspect.data.sharding import Shard

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


@dataclass
class RunOptions:
    """How a command that loads a trained model runs it: the options :func:`run_options` adds."""

    batch_size: int | None = None
    workers: int | None = None
    threads: int = 0
    device: str = "auto"
    quiet: bool = False

    def reporter(self) -> Any:
        return make_reporter(self.quiet)

    def load(self, model: Path | None, reporter: Any, note: str = "", **load_args: Any) -> Any:
        """The model (``None``: the latest) on ``--device`` with ``--threads``, reported in one line;
        ``load_args`` go to :func:`surfaceinspect.engine.load` (``runtime``, or a fixed ``device``)."""
        from surfaceinspect import engine

        loaded = engine.load(model, **{"device": self.device, "threads": self.threads, **load_args})
        report_model(reporter, loaded, note)
        return loaded


# The model's own batch size and workers apply unless given; its device and threads are where it runs now.
_RUN_OPTIONS: dict[str, tuple[Any, Any]] = {
    "batch_size": (Annotated[int | None, _batch_option("the model's")], None),
    "workers": (Annotated[int | None, _workers_option("the model's")], None),
    "threads": (Annotated[int, _threads_option(True)], 0),
    "device": (Annotated[str, _device_option(True)], "auto"),
    "quiet": (QuietOpt, False),
}


def run_options(*names: str) -> Callable[[F], F]:
    """Add the options ``names`` (fields of :class:`RunOptions`) after a command's own; it gets them as ``run``.

    One definition for the options every model-loading command repeats (Typer reads the signature).
    """

    def decorate(func: F) -> F:
        hints = get_type_hints(func, include_extras=True)
        own = [
            param.replace(annotation=hints.get(param.name, param.annotation))
            for param in inspect.signature(func).parameters.values()
            if param.name != "run"
        ]
        added = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=_RUN_OPTIONS[name][1], annotation=_RUN_OPTIONS[name][0]
            )
            for name in names
        ]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return func(*args, run=RunOptions(**{name: kwargs.pop(name) for name in names}), **kwargs)

        wrapper.__signature__ = inspect.Signature(own + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {param.name: param.annotation for param in own + added}
        return wrapper  # type: ignore[return-value]

    return decorate


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
                f"--{name.replace('_', '-')}",
                metavar="VALUE",
                help="; ".join(texts) + ".",
                rich_help_panel=METHOD_OPTIONS_PANEL,
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


def _help_names() -> dict[str, str]:
    """What ``{methods}`` and ``{profiles}`` stand for in option help: the registered methods and the
    installed profiles, read when the help is shown (so a method registered later shows up too)."""
    from surfaceinspect.profiles import profile_names

    return {"methods": ", ".join(available_methods()), "profiles": ", ".join(profile_names())}


def _flags_without_type(params: list[Any]) -> list[Any]:
    """Flags take no value, so their help names none (Typer would show ``<bool>``); an argument's name
    (IMAGES, GOOD_DIR) says what it is, so it shows no ``<path>`` either."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar is not None:
            param.display_type_rich = _no_type  # Typer's own method shows the Python type for arguments
    return params


def _no_type(ctx: Any) -> None:
    return None


class LiveHelpCommand(TyperCommand):
    """Every command's class: flags show no type, and option help may name ``{methods}`` and ``{profiles}``,
    filled in when shown."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        params = _flags_without_type(super().get_params(ctx))
        names: dict[str, str] | None = None
        for param in params:
            template = getattr(param, "help_template", None) or getattr(param, "help", None) or ""
            if "{methods}" in template or "{profiles}" in template:
                names = names or _help_names()
                param.help_template = template  # type: ignore[attr-defined]
                param.help = template.format(**names)  # type: ignore[attr-defined]
        return params


class MethodOptionsCommand(LiveHelpCommand):
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


def make_reporter(quiet: bool):
    from surfaceinspect.ui import Reporter

    return Reporter(cli.err_console, quiet=quiet)


def reflow_help(doc: str) -> str:
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
