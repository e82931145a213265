"""``surfaceinspect serve``."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from surfaceinspect import cli
from surfaceinspect.cli import common
from surfaceinspect.errors import EXIT_OK

# The defaults of surfaceinspect.deploy.serve, repeated: importing it here would load torch and starlette for every
# command (tests/test_serve.py checks that the two agree).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_WAIT_MS = 5.0
MIB = 1 << 20
DEFAULT_MAX_BYTES = 32 * MIB
DEFAULT_MAX_PENDING = 256
TOKEN_ENV = "SURFACEINSPECT_TOKEN"
MIN_TOKEN_CHARS = 16


@cli.app.command(
    epilog=(
        "Examples:\n\n"
        "  surfaceinspect serve --model runs/line3   (http://127.0.0.1:8080)\n\n"
        "  curl --data-binary @part.png -H 'Content-Type: image/png' http://127.0.0.1:8080/score\n\n"
        "  curl -F file=@part.png http://127.0.0.1:8080/heatmap -o part_heatmap.png\n\n"
        "  surfaceinspect serve --host 0.0.0.0 --token-file /etc/surfaceinspect/token --records line3.jsonl\n\n"
        "Endpoints, curl examples and security notes: docs/deploy.md (HTTP service).\n\n"
        "Exit codes: 0 stopped by SIGTERM (requests in flight finish first) · 130 interrupted by Ctrl-C · "
        "2 usage, model, port or output error · 4 internal error (rerun with --debug)."
    )
)
@common.handle_errors
@common.run_options("threads", "device", "quiet")
def serve(
    model: common.ModelOpt = None,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            metavar="ADDRESS",
            help="Address to listen on. The default, loopback, is reachable from this machine only; 0.0.0.0 "
            "(every interface) exposes the model to the network: set a token then.",
        ),
    ] = DEFAULT_HOST,
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="TCP port (0: any free port).")
    ] = DEFAULT_PORT,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            metavar="FILE",
            help=f"Require `Authorization: Bearer TOKEN` on every endpoint but /health, TOKEN being FILE's first "
            f"line (keep it chmod 600). Or set ${TOKEN_ENV}; --token-file wins. Never on the command line, "
            "where every user of the machine could read it. (default: no token)",
        ),
    ] = None,
    records: Annotated[
        Path | None,
        typer.Option(
            "--records",
            metavar="FILE",
            help="Append every record (from /score and /heatmap) to FILE (.jsonl or .csv), one flushed line each, "
            "as watch appends. An existing records file is continued; any other file is refused.",
        ),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            min=1,
            help="Score up to N requests, from any clients, as one batch (throughput under load).",
            metavar="N",
        ),
    ] = DEFAULT_MAX_BATCH,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            "--max-wait-ms",
            min=0.0,
            metavar="MS",
            help="How long the first request of a batch waits for others to join it: the most latency that "
            "batching adds to a lone request.",
        ),
    ] = DEFAULT_MAX_WAIT_MS,
    max_bytes: Annotated[
        int,
        typer.Option(
            "--max-bytes",
            min=1,
            metavar="BYTES",
            help=f"Largest request body accepted (larger: 413, never read). (default: {DEFAULT_MAX_BYTES} = "
            f"{DEFAULT_MAX_BYTES // MIB} MiB)",
            show_default=False,
        ),
    ] = DEFAULT_MAX_BYTES,
    max_pending: Annotated[
        int,
        typer.Option(
            "--max-pending",
            min=1,
            metavar="N",
            help="Requests in progress at most (read, decoded, queued or scored); more get 503 at once, "
            "so a flood cannot fill the memory with decoded images.",
        ),
    ] = DEFAULT_MAX_PENDING,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Log every request (uvicorn's access log, on stderr).")
    ] = False,
    runtime: common.RuntimeOpt = None,
    drift_window: common.DriftWindowOpt = 50,
    *,
    run: common.RunOptions,
) -> None:
    """Serve a trained model over HTTP: POST an image, get its record (or its heatmap) back.

    POST /score takes an image (its bytes with Content-Type image/..., or a multipart form with one
    file) and answers the JSON record score writes for it (docs/records.md); POST /heatmap answers the
    overlay PNG heatmap draws. GET /health and GET /metrics (Prometheus) watch the service.
    Requests of all clients are scored in batches of up to --max-batch, each waiting at most
    --max-wait-ms for the others. A body that is no image gets a 4xx and a one-line JSON error;
    nothing a client sends stops the service. Runs until SIGTERM (exit 0) or Ctrl-C.
    """
    from surfaceinspect.deploy.serve import ServeOptions, Service, bind, open_records, read_token, run_server
    from surfaceinspect.storage import modeldir

    reporter = run.reporter()
    token = read_token(token_file, dict(os.environ))
    if token_file is not None:
        _check_token_file(token_file, reporter)
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        reporter.warn(f"the token has only {len(token)} characters; use at least {MIN_TOKEN_CHARS} random ones")
    if token is None and not _is_loopback(host):
        reporter.warn(f"--host {host} without a token: anyone who can reach this port can use the model")
    # The port and the records file are checked before the model loads: a refusal comes in a second.
    sock = bind(host, port)
    writer = None
    try:
        run_dir = modeldir.resolve_model_dir(model)  # once: the records are checked against the model served
        if records is not None:
            writer = open_records(records, run_dir)
        loaded = run.load(run_dir, reporter, runtime=runtime)
        options = ServeOptions(
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_bytes=max_bytes,
            max_pending=max_pending,
            token=token,
            drift_window=drift_window,
            debug=common.run_state["debug"],
        )
        service = Service(loaded, options, writer=writer, reporter=reporter)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        reporter.info(
            f"serving on http://{shown}:{bound_port} (POST /score, POST /heatmap, GET /health, GET /metrics); "
            + ("token required" if token else "no token")
            + (f"; records: {records}" if records is not None else "")
        )
        with _sigterm_stops() as terminated:
            run_server(service, sock, access_log=access_log)
    finally:
        sock.close()
        if writer is not None:
            writer.close()
    verdicts = service.metrics.verdicts
    reporter.info(
        f"stopped{' by SIGTERM' if terminated else ''} after {service.metrics.uptime():.0f} s: "
        f"{verdicts['good']} good, {verdicts['defect']} defect, {verdicts['error']} error; {service.drift.describe()}"
    )
    raise typer.Exit(EXIT_OK)


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[list[int]]:
    """SIGTERM is how a service is stopped (systemd, Kubernetes): a clean stop, exit 0, not an interruption.

    uvicorn handles SIGTERM itself (stops listening, lets requests in flight finish), then raises it again
    for the handler it found; that handler only notes it. Ctrl-C keeps Python's handler: exit 130.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum: int, _frame: Any) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, note)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_token_file(path: Path, reporter: Any) -> None:
    with contextlib.suppress(OSError):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            reporter.warn(f"--token-file {path} is readable by other users; chmod 600 {path}")
