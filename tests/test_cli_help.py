"""The commands' --help: docstring paragraphs rewrap to the terminal instead of breaking mid-sentence."""

from __future__ import annotations

from typer.testing import CliRunner

from surfaceinspect.cli import app
from surfaceinspect.cli.common import reflow_help as _reflow_help


def test_reflow_joins_paragraph_lines_and_keeps_lists_and_examples():
    doc = """Summary line.

    A sentence that the source
    breaks in two, --out included.

    - a list item
    - another

      $ an example
    """
    assert _reflow_help(doc) == (
        "Summary line.\n\nA sentence that the source breaks in two, --out included."
        "\n\n- a list item\n- another\n\n  $ an example"
    )


def test_every_command_help_wraps_to_a_wide_terminal():
    runner = CliRunner()
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output
    assert "at least common.calibration.min_images) is held out to set the decision threshold" in text
    for command in ("score", "heatmap", "recalibrate", "benchmark", "watch", "demo", "profiles"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"})
        assert result.exit_code == 0, command
