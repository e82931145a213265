"""deploy/systemd: the example units pass `systemd-analyze verify` and run command lines the CLI accepts."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer

from surfaceinspect.cli import app

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
BINARY = "/opt/surfaceinspect/venv/bin/surfaceinspect"  # where the units expect the installed console script
# the unit files, and the instance name each is verified as (a template needs one)
VERIFY_AS = {"surfaceinspect-watch@.service": "surfaceinspect-watch@line3.service",
             "surfaceinspect-serve.service": "surfaceinspect-serve.service"}  # fmt: skip


def exec_start(unit: Path) -> list[str]:
    """The ExecStart command line of ``unit`` (continuation lines joined), as words."""
    text = unit.read_text().replace("\\\n", " ")
    match = re.search(r"^ExecStart=(.+)$", text, re.MULTILINE)
    assert match, unit
    return shlex.split(match.group(1))


def test_every_unit_is_covered():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(VERIFY_AS)


@pytest.mark.parametrize("name", sorted(VERIFY_AS))
def test_unit_passes_systemd_analyze_verify(name, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify also checks that ExecStart's program exists: point a copy at one that does
    text = (UNITS / name).read_text()
    assert BINARY in text
    (tmp_path / name).write_text(text.replace(BINARY, shutil.which("true") or "/bin/true"))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / VERIFY_AS[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # unknown or misspelt keys are only warnings (exit 0): any line about our unit fails the test
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if "surfaceinspect" in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(VERIFY_AS))
def test_unit_runs_as_its_own_user_restarts_on_failure_and_is_hardened(name):
    settings = {}
    for line in (UNITS / name).read_text().replace("\\\n", " ").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key.strip(), []).append(value.strip())
    assert settings["User"] == ["surfaceinspect"] and settings["Restart"] == ["on-failure"]
    assert settings["KillSignal"] == ["SIGTERM"] and settings["RestartPreventExitStatus"] == ["2"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes")):
        assert settings[key] == [value], key
    assert any(path.startswith("/var/lib/surfaceinspect/records") for path in settings["ReadWritePaths"][0].split())
    assert any(v.startswith("OMP_NUM_THREADS=") for v in settings["Environment"])


@pytest.mark.parametrize("name", sorted(VERIFY_AS))
def test_unit_command_line_is_one_the_cli_accepts(name):
    """Options renamed in the CLI must not leave the units behind (serve: once that command exists)."""
    words = exec_start(UNITS / name)
    assert words[0] == BINARY
    command_name, args = words[1], words[2:]
    group = typer.main.get_command(app)
    command = group.get_command(None, command_name)  # type: ignore[attr-defined]
    if command is None:
        pytest.skip(f"surfaceinspect {command_name} is not part of this version")
    substitutes = {"${CAMERA_DIR}": "/srv/camera/line3", "${MODEL_DIR}": "/models/line3", "%i": "line3", "%d": "/c"}
    for old, new in substitutes.items():
        args = [a.replace(old, new) for a in args]
    command.make_context(command_name, args)  # raises on an unknown option or a bad value
