"""What ``watch`` does with a defective image besides its record: ``--on-defect CMD`` and ``--defects-dir``."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import time
from pathlib import Path

from surfaceinspect.errors import ConfigError
from surfaceinspect.storage.records import ScoreRecord
from surfaceinspect.ui import Reporter

MAX_RUNNING_HOOKS = 4  # --on-defect commands running at once; the next waits (back-pressure)
HOOK_WAIT_AT_EXIT_S = 30.0


class DefectHook:
    """Runs ``--on-defect CMD`` for each defective image, without a shell.

    ``CMD`` is split like a shell would (``shlex``), but never run by one: the image path is
    passed as the last argument, so no file name can inject a command. The record is in the
    environment (``SURFACEINSPECT_RECORD`` as JSON, ``SURFACEINSPECT_SCORE``,
    ``SURFACEINSPECT_SCORE_NORMALIZED``). Commands run in the background, at most
    :data:`MAX_RUNNING_HOOKS` at once; a failure is a warning, never the end of the watch.
    """

    def __init__(self, command: str, reporter: Reporter) -> None:
        try:
            self.argv = shlex.split(command)
        except ValueError as exc:
            raise ConfigError(f"--on-defect {command!r}: {exc}") from None
        if not self.argv:
            raise ConfigError("--on-defect is empty; give a command, e.g. --on-defect 'notify-line 3'")
        if shutil.which(self.argv[0]) is None:
            raise ConfigError(f"--on-defect: command {self.argv[0]!r} not found or not executable; give its full path")
        self.reporter = reporter
        self.running: list[tuple[subprocess.Popen[bytes], str]] = []
        self.failures = 0

    def __call__(self, image: Path, record: ScoreRecord) -> None:
        self.reap()
        while len(self.running) >= MAX_RUNNING_HOOKS:
            self._finish(*self.running.pop(0))
        data = record.to_dict()
        env = {
            **os.environ,
            "SURFACEINSPECT_RECORD": json.dumps(data, ensure_ascii=False),
            "SURFACEINSPECT_SCORE": str(data["score"]),
            "SURFACEINSPECT_SCORE_NORMALIZED": str(data["score_normalized"]),
        }
        try:
            proc = subprocess.Popen([*self.argv, str(image)], stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            self.failures += 1
            self.reporter.warn(f"--on-defect could not start for {record.path}: {exc.strerror or exc}")
            return
        self.running.append((proc, record.path))

    def reap(self) -> None:
        """Collect finished commands (non-blocking) and warn about failures."""
        still = []
        for proc, name in self.running:
            if proc.poll() is None:
                still.append((proc, name))
            else:
                self._finish(proc, name)
        self.running = still

    def _finish(self, proc: subprocess.Popen[bytes], name: str, timeout: float | None = None) -> None:
        code = proc.wait(timeout)
        if code != 0:
            self.failures += 1
            self.reporter.warn(f"--on-defect exited with {code} for {name}")

    def close(self) -> None:
        """Wait (up to :data:`HOOK_WAIT_AT_EXIT_S` in all) for the commands still running."""
        deadline = time.monotonic() + HOOK_WAIT_AT_EXIT_S
        for proc, name in self.running:
            try:
                self._finish(proc, name, timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.reporter.warn(f"--on-defect for {name} still running (pid {proc.pid}); not waiting for it")
        self.running = []


def copy_defect(image: Path, rel: str, defects_dir: Path) -> Path:
    """Copy ``image`` to ``defects_dir/rel`` atomically (readers never see a partial copy).

    Never through a symbolic link below ``defects_dir`` (OSError ``ELOOP`` instead); the copy keeps
    the image's permissions and time stamps.
    """
    from surfaceinspect.storage.atomic import atomic_open

    target = defects_dir / rel
    with open(image, "rb") as source, atomic_open(target, "wb", below=defects_dir) as handle:
        shutil.copyfileobj(source, handle)
        handle.flush()
        st = os.fstat(source.fileno())
        # on the open copy, not by path: a path could lead through a link made meanwhile
        os.chmod(handle.fileno(), stat.S_IMODE(st.st_mode))
        os.utime(handle.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
    return target
