"""The commands' --help and argument errors: paragraphs rewrap to the terminal, one name per concept, types in
words, defaults shown, argument errors in one line."""

from __future__ import annotations

import itertools
import re
import types
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from surfaceinspect import engine
from surfaceinspect.cli import COMMANDS, app
from surfaceinspect.cli.common import reflow_help as _reflow_help
from surfaceinspect.errors import EXIT_USAGE, ConfigError


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


# One name per concept, types in words, defaults shown, argument errors in one line (issue #29).

BOX = set("╭│╰─")


def _commands() -> dict[str, Any]:
    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in COMMANDS}


def _shown_params(command: Any) -> tuple[Any, list[Any]]:
    ctx = command.make_context(command.name, [], resilient_parsing=True)
    return ctx, [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["score", "--bogus"], "error: no such option: --bogus"),
        (["score"], "error: missing argument 'IMAGES'."),
        (["heatmap", "imgs", "--batch-size", "many"], "error: invalid value for '--batch-size'"),
        (["train", "--epochs", "x"], "error: invalid value for '--epochs'"),
        (["bogus"], "error: no such command 'bogus'."),
    ],
)
def test_argument_errors_are_one_error_line_and_where_the_help_is(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_USAGE
    lines = result.output.strip().splitlines()
    command = "surfaceinspect" + (f" {args[0]}" if args[0] != "bogus" else "")
    assert len(lines) == 2 and lines[0].startswith(message), result.output
    assert lines[1] == f"Try '{command} -h' for help."
    assert not BOX & set(result.output)


def test_no_arguments_still_show_the_help():
    result = CliRunner().invoke(app, [])
    assert result.exit_code == EXIT_USAGE and "Commands" in result.output


def test_the_same_concept_has_the_same_name_in_every_command():
    metavars: dict[str, dict[str, str]] = {}  # option -> command -> the value it names
    arguments: dict[str, list[str]] = {}
    for name, command in _commands().items():
        ctx, params = _shown_params(command)
        for param in params:
            shown = param.display_type_rich(ctx) or ""
            assert not shown.startswith("<"), (name, param.name, shown)  # a word, not Typer's <int>, <bool>, <path>
            if param.param_type_name == "argument":
                arguments[name] = [*arguments.get(name, []), param.metavar]
            elif not param.is_flag:
                metavars.setdefault(param.opts[0], {})[name] = shown
    assert arguments["train"] == arguments["recalibrate"] == ["GOOD_DIR"]
    assert arguments["score"] == arguments["heatmap"] == ["IMAGES"]
    for option, by_command in metavars.items():
        assert len(set(by_command.values())) == 1, (option, by_command)
    assert metavars["--out"]["train"] == "DIR" and metavars["--output"]["score"] == "FILE"
    assert metavars["--model"]["score"] == "RUN" and metavars["--device"]["train"] == "auto|cpu|cuda[:N]"
    assert set(metavars["--out"]) >= {"train", "heatmap", "export", "benchmark", "demo"}
    assert metavars["--calibration-mode"] == {"train": "quantile|f1|recall", "recalibrate": "quantile|f1|recall"}
    assert "--mode" not in metavars and metavars["--format"] == {"score": "csv|jsonl", "watch": "csv|jsonl"}


def test_flags_show_no_type():
    text = _help("score")
    assert "<bool>" not in text and re.search(r"--quiet\s+-q\s+No progress bars", text)


@pytest.mark.parametrize(
    "command, option, default",
    [
        ("train", "--method", "(auto, or the --config file's method)"),
        ("train", "--false-reject-rate", "(0.01)"),
        ("train", "--batch-size", "(the profile's)"),
        ("score", "--batch-size", "(the model's)"),
        ("score", "--device", "auto"),
        ("score", "--runtime", "auto"),
        ("recalibrate", "--calibration-mode", "(the model's)"),
        ("heatmap", "--model", "(the latest trained model)"),
    ],
)
def test_defaults_are_shown(command, option, default):
    lines = _help(command).splitlines()
    first = next(i for i, line in enumerate(lines) if re.search(rf"│ (\* )?\s*{option}\s", line))
    wrapped = itertools.takewhile(lambda line: re.match(r"│\s{20}", line), lines[first + 1 :])
    help_text = " ".join([lines[first], *wrapped])
    assert f"[default: {default}]" in help_text, help_text


class _Stop(ConfigError):
    """Ends a command where the test has seen what it needed."""


def _fake_model(monkeypatch) -> list[dict]:
    """engine.load records its arguments and returns a stand-in for the model, so no model is needed."""
    loads: list[dict] = []
    detector = types.SimpleNamespace(name="toy", device="cpu")
    model = types.SimpleNamespace(
        run_dir="RUN", detector=detector, model_id="m", calibration=None, metadata={}, notes=[]
    )
    monkeypatch.setattr(engine, "load", lambda model_dir, **kw: loads.append(kw) or model)
    return loads


def _stop_with(**seen: Any) -> _Stop:
    return _Stop(" ".join(f"{k}={v}" for k, v in seen.items()))


def test_recalibrate_takes_the_old_mode_spelling(monkeypatch, tmp_path):
    loads = _fake_model(monkeypatch)

    def recalibrate(loaded, folder, *, mode, batch_size, workers, **_):
        raise _stop_with(mode=mode, batch=batch_size, workers=workers)

    monkeypatch.setattr(engine, "recalibrate", recalibrate)
    runner = CliRunner()
    result = runner.invoke(app, ["recalibrate", str(tmp_path), "--mode", "f1", "--threads", "2", "-b", "4"])
    assert result.exit_code == EXIT_USAGE and "error: mode=f1 batch=4 workers=None" in result.output, result.output
    assert loads == [{"device": "auto", "threads": 2, "need_calibration": False}]
    result = runner.invoke(app, ["recalibrate", str(tmp_path), "--calibration-mode", "recall", "--device", "cpu"])
    assert "error: mode=recall" in result.output and loads[-1]["device"] == "cpu"
    result = runner.invoke(app, ["recalibrate", str(tmp_path), "--calibration-mode", "f1", "--mode", "recall"])
    assert result.exit_code == EXIT_USAGE and "--mode is the old spelling of --calibration-mode" in result.output
    assert "--mode " not in _help("recalibrate")


def test_export_takes_the_old_format_spelling(monkeypatch):
    loads = _fake_model(monkeypatch)

    def export_run(*args, fmt, **_):
        raise _stop_with(fmt=fmt)

    monkeypatch.setattr("surfaceinspect.deploy.export.export_run", export_run)
    for args in (["--format", "onnx"], ["--export-format", "onnx"], []):
        result = CliRunner().invoke(app, ["export", *args, "--threads", "3"])
        assert result.exit_code == EXIT_USAGE and "error: fmt=onnx" in result.output, (args, result.output)
    assert loads[-1] == {"device": "cpu", "threads": 3, "runtime": "torch"}
    assert "--format" not in _help("export")


def test_profiles_says_what_each_profile_is_for_and_what_auto_does():
    listed = CliRunner().invoke(app, ["profiles"], env={"COLUMNS": "2000"})
    assert listed.exit_code == 0
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in listed.output.splitlines() if "│" in line]
    assert len(rows) >= 4 and all(len(row) == 4 and row[2] for row in rows), rows  # method, profile, for, file
    assert "without --method (= auto)" in listed.output
