"""Errors and exit codes of every command: one clear line on stderr, never a traceback (unless --debug).

User mistakes exit 2, a bug 4, an interruption 130, a closed output pipe 141; where the scoring
install (no torch) meets a command that needs torch, one line names the full install.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer

try:  # Typer >= 0.2x carries its own click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older Typer uses click itself
    from click.exceptions import NoArgsIsHelpError, UsageError  # type: ignore[no-redef]

from surfaceinspect import cli
from surfaceinspect.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ConfigError,
    SurfaceInspectError,
)
from surfaceinspect.ui import styled

EXIT_CODES_HELP = (
    "Exit codes: 0 all images good · 1 at least one defect (0 with --no-fail-on-defect) · 3 some images unreadable "
    "(no defect) · 2 usage, input, output, config or model error · 4 internal error (rerun with --debug) · "
    "5 drift detected (score and watch, only with --fail-on-drift) · 130 interrupted (Ctrl-C or SIGTERM) · "
    "141 the standard output was closed by its reader (| head)."
)


run_state: dict[str, bool] = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def print_error(message: str) -> None:
    """``error: message`` on stderr; the message is printed as it is (never parsed as markup)."""
    try:
        cli.err_console.print(styled(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    except Exception:  # noqa: BLE001 - the exit code must survive a broken terminal
        sys.stderr.write(f"error: {message}\n")


def fail(message: str, code: int) -> typer.Exit:
    print_error(message)
    return typer.Exit(code)


def stdout_closed() -> typer.Exit:
    """The reader of the standard output went away (``score --json | head -1``): stop quietly with 141.

    As ``head`` expects of a process it stops reading from (SIGPIPE's exit status); records already
    written to ``--output`` are kept as on Ctrl-C. Standard output is pointed at /dev/null so the
    interpreter's last flush cannot raise again.
    """
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return typer.Exit(EXIT_BROKEN_PIPE)


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
            if run_state["debug"]:
                raise
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt as exc:
            by = " (SIGTERM)" if isinstance(exc, Terminated) else ""
            raise fail(f"interrupted{by}", EXIT_INTERRUPTED) from None
        except MemoryError:
            raise fail("out of memory; lower --batch-size or --image-size", EXIT_USAGE) from None
        except BrokenPipeError:
            raise stdout_closed() from None
        except ModuleNotFoundError as exc:
            if run_state["debug"] or (exc.name or "").split(".")[0] not in TRAINING_PACKAGES:
                raise
            raise fail(training_install_hint(exc.name or "torch"), EXIT_USAGE) from None
        except Exception as exc:
            if run_state["debug"]:
                raise
            raise _internal_or_os_error(exc) from None

    return wrapper  # type: ignore[return-value]


# What the full install has and the scoring install (surfaceinspect-runtime) leaves out.
TRAINING_PACKAGES = frozenset({"torch", "torchvision", "onnx", "onnxscript", "safetensors", "sklearn", "scipy"})


def require_full_install() -> None:
    """Refuse at once, in one line, a command that needs torch where it is not installed (surfaceinspect-runtime),
    before it writes anything (``demo`` would generate its data set first)."""
    from surfaceinspect.device import torch_installed

    if not torch_installed():
        raise ConfigError(training_install_hint("torch"))


def training_install_hint(package: str) -> str:
    """The one line for a command that needs a package of the full install, run in the scoring install."""
    return (
        f"{package.split('.')[0]} is not installed: this install scores exported models only (score, heatmap, watch, "
        "serve, recalibrate: surfaceinspect-runtime); train, export and benchmark with the full install "
        "(`pip install surfaceinspect`), then score its RUN/export-onnx here"
    )


def _usage_error(exc: UsageError) -> Exception:
    if isinstance(exc, NoArgsIsHelpError):
        return exc  # no arguments at all: the help itself, as before
    message = exc.format_message()
    print_error(message[:1].lower() + message[1:] if message[1:2].islower() else message)
    command = exc.ctx.command_path if exc.ctx is not None else "surfaceinspect"
    hint = f"Try '{command} -h' for help."
    try:
        cli.err_console.print(hint, markup=False, highlight=False, soft_wrap=True)
    except Exception:  # noqa: BLE001 - the exit code must survive a broken terminal
        sys.stderr.write(hint + "\n")
    return typer.Exit(exc.exit_code)


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
    from surfaceinspect.storage.outputs import os_error_message

    message = os_error_message(exc) if isinstance(exc, OSError) else None
    if message is not None:  # e.g. disk full or permission denied while writing: the user can fix it
        return fail(message, EXIT_USAGE)
    return fail(
        f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)",
        EXIT_INTERNAL,
    )


def show_warning(message: Any, category: type[Warning], filename: str, lineno: int, *_: Any, **__: Any) -> None:
    """Python warnings as one ``warning:`` line (with --debug: where they came from)."""
    where = f" ({category.__name__} at {filename}:{lineno})" if run_state["debug"] else ""
    try:
        cli.err_console.print(styled(("warning:", "yellow"), f" {message}{where}"), highlight=False)
    except Exception:  # noqa: BLE001 - a warning must never end the run
        sys.stderr.write(f"warning: {message}\n")
