"""The ``surfaceinspect`` command line: thin wrappers over :mod:`surfaceinspect.engine`.

One module per command (:mod:`.train`, :mod:`.score`, :mod:`.heatmap`, :mod:`.export`,
:mod:`.recalibrate`, :mod:`.benchmark`, :mod:`.demo`, :mod:`.profiles`, :mod:`.watch`, :mod:`.serve`), the
options and error handling they share in :mod:`.common`. The Typer ``app``, :func:`main` (the
console script) and the two consoles live here, and the commands look them up here when they run,
so that an embedding program (or a test) can replace ``cli.out_console``/``cli.err_console``.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Annotated

import typer
from rich.console import Console

import surfaceinspect
from surfaceinspect.cli.common import (
    EXIT_CODES_HELP,
    Group,
    LiveHelpCommand,
    print_error,
    reflow_help,
    run_state,
    show_warning,
    stdout_closed,
)
from surfaceinspect.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK

app = typer.Typer(
    name="surfaceinspect",
    help=(
        "Find surface defects with anomaly detection trained on good images only.\n\n"
        "Typical use:\n\n"
        "  surfaceinspect train --method draem ./good_images\n\n"
        "  surfaceinspect score ./line_camera_dump --output results.csv\n\n"
        "  surfaceinspect heatmap ./line_camera_dump --out heatmaps/\n\n"
        "-o is a FILE in score (--output) and a DIR elsewhere (--out).\n\n" + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    cls=Group,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

err_console = Console(stderr=True)
out_console = Console()


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
    run_state["debug"] = debug
    warnings.showwarning = show_warning


def main() -> None:
    """Console-script entry point: whatever happens, a bug exits 4, never 0, 1 or 3."""
    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # outside a command (e.g. --help | head)
        sys.exit(stdout_closed().exit_code)
    except Exception as exc:  # the last line of defence for the exit code
        if run_state["debug"]:
            raise
        print_error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)")
        sys.exit(EXIT_INTERNAL)


# One module per command; each registers its command on ``app`` when imported, in the help's order.
COMMANDS = ("train", "score", "heatmap", "export", "recalibrate", "benchmark", "demo", "profiles", "watch", "serve")
for _name in COMMANDS:
    importlib.import_module(f"{__name__}.{_name}")

for _command in app.registered_commands:
    if _command.cls is None or not issubclass(_command.cls, LiveHelpCommand):
        _command.cls = LiveHelpCommand  # flags without a type, {methods}/{profiles} filled in
    if _command.help is None and _command.callback is not None and _command.callback.__doc__:
        _command.help = reflow_help(_command.callback.__doc__)

__all__ = ["COMMANDS", "app", "err_console", "main", "out_console"]
