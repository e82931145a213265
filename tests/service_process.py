"""A real ``surfaceinspect serve`` process for tests: a free port, started, waited for, stopped by SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen
    base: str  # http://127.0.0.1:PORT
    stderr: str = ""  # after the block: what the server wrote


@contextmanager
def serve_process(command: list[str], env: dict[str, str], port: int) -> Iterator[Served]:
    """Start ``command`` (a ``serve`` on ``port``), wait until /health answers, and at the end of the block
    stop it with SIGTERM (``stderr`` then holds its output); a server that does not stop is killed."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    served = Served(proc, f"http://127.0.0.1:{port}")
    try:
        wait_until_serving(proc, served.base)
        yield served
        proc.send_signal(signal.SIGTERM)
        _out, served.stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until_serving(proc: subprocess.Popen, base: str, timeout: float = 120.0) -> None:
    """Poll ``base``/health until it answers 200; fail if the process ends first or ``timeout`` passes."""
    import httpx2

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx2.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx2.TransportError:
            time.sleep(0.1)
