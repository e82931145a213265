"""``surfaceinspect demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from surfaceinspect import cli
from surfaceinspect.cli import common
from surfaceinspect.detectors import available_methods
from surfaceinspect.ui import styled


@cli.app.command()
@common.handle_errors
def demo(
    out: Annotated[
        Path, common.out_option("DIR for the generated data, models and outputs (new, or an earlier demo output).")
    ] = Path("demo_output"),
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method", "-m", metavar="METHOD", help="Methods to run (repeatable).", show_default="all of them"
        ),
    ] = None,
    quiet: common.QuietOpt = False,
) -> None:
    """End-to-end tour on a generated dataset: train, score, heatmaps (a few minutes on a CPU)."""
    from surfaceinspect.workflows.demo import run_demo

    common.require_full_install()
    reporter = common.make_reporter(quiet)
    lines = run_demo(out, method or available_methods(), reporter)
    for line in lines:
        cli.out_console.print(styled(line), highlight=False)
