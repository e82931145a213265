"""The HTTP service (``surfaceinspect serve``): score images sent over HTTP, micro-batched across clients.

Endpoints (see docs/deploy.md, "HTTP service"):

* ``POST /score``: an image (its bytes with an ``image/*`` content type, or ``multipart/form-data``
  with one file) -> the JSON record ``score`` writes for it (docs/records.md), one line.
* ``POST /heatmap``: the same body -> the overlay PNG ``heatmap`` writes (verdict and score in the
  ``X-Verdict`` and ``X-Score`` headers).
* ``GET /health``: model id, method, runtime, uptime, ready (503 while not ready); never needs the token.
* ``GET /metrics``: Prometheus text format: verdicts, a latency histogram, errors by status, batch
  sizes, and the drift check of :mod:`surfaceinspect.analysis.drift` (as ``score`` and ``watch`` run it).

How a request is served: its body is read (at most ``max_bytes``) and decoded in a thread pool, so
a large image never blocks the event loop; the decoded image then waits on an asyncio queue. One
collector coroutine takes up to ``max_batch`` of them, waiting at most ``max_wait_ms`` after the
first, and hands them to the one inference thread as one batch: the engine path of ``score``
(:func:`~surfaceinspect.engine.inference.score_batch`), so a record is the one ``score`` would write.
While a batch is scored the next one gathers, so under load batches fill by themselves, and a lone
request waits at most ``max_wait_ms``.

Nothing a client sends stops the service: a body that is no image (empty, truncated, too large,
another content type) gets a 4xx with a one-line JSON ``{"error": ...}``; a failure while scoring
fails only its own request (500, same form) -- a batch that fails is scored again image by image.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import surfaceinspect
from surfaceinspect.analysis.drift import DEFAULT_WINDOW
from surfaceinspect.data.imageio import read_image_bytes
from surfaceinspect.data.streaming import LoadedImage, load_item
from surfaceinspect.data.tiling import TiledPredictor
from surfaceinspect.deploy.metrics import Metrics
from surfaceinspect.engine.checks import reliability_checks
from surfaceinspect.engine.heatmaps import overlay_image
from surfaceinspect.engine.inference import ImageResult, score_batch
from surfaceinspect.engine.loading import LoadedModel
from surfaceinspect.engine.scoring import drift_monitor
from surfaceinspect.errors import ConfigError, SurfaceInspectError
from surfaceinspect.storage.records import RecordWriter, format_score, open_records_for_append
from surfaceinspect.ui import Reporter

MIB = 1 << 20
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_BYTES = 32 * MIB
DEFAULT_MAX_PENDING = 256  # requests being read, decoded, queued or scored at once; more get 503
TOKEN_ENV = "SURFACEINSPECT_TOKEN"
NAME_HEADER = "x-image-name"
MAX_NAME_CHARS = 512
GRACEFUL_SHUTDOWN_S = 30  # SIGTERM: how long requests in flight may take to finish
ENDPOINTS = {"/score": "score", "/heatmap": "heatmap", "/health": "health", "/metrics": "metrics"}
OPEN_PATHS = ("/health",)  # reachable without the token (a load balancer's health check has none)


class RequestError(Exception):
    """A request the service refuses: its HTTP status and a one-line reason for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServeOptions:
    """How the service batches and what it accepts; see ``surfaceinspect serve --help``."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pending: int = DEFAULT_MAX_PENDING
    token: str | None = None  # every endpoint but /health then needs ``Authorization: Bearer TOKEN``
    drift_window: int = DEFAULT_WINDOW
    debug: bool = False  # print the traceback of internal errors


def error_body(message: str) -> bytes:
    """``{"error": "..."}`` on one line (a message's own line breaks are escaped by JSON)."""
    return (json.dumps({"error": message}, ensure_ascii=False) + "\n").encode()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


def clean_name(text: str) -> str:
    """A client's name for an image as a record path: control characters replaced, at most MAX_NAME_CHARS."""
    cleaned = "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in text.strip())
    return cleaned[:MAX_NAME_CHARS]


def read_token(token_file: Path | None, environ: dict[str, str]) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$SURFACEINSPECT_TOKEN``, else None (no token).

    Never from the command line, where every user of the machine could read it (``ps``).
    """
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"--token-file {token_file}: cannot read it ({reason})") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise ConfigError(f"--token-file {token_file} is empty; write the token into it")
        return token
    token = environ.get(TOKEN_ENV, "").strip()
    return token or None


# ---------------------------------------------------------------------------------------------
# The service


@dataclass
class _Job:
    item: LoadedImage
    name: str
    future: asyncio.Future[ImageResult]


class Service:
    """One loaded model behind the HTTP endpoints: the micro-batching queue and the inference thread.

    ``writer`` (optional) gets every record, in the order they are scored; the caller closes it
    after :meth:`stop`. ``reporter`` gets the drift warnings and the internal errors.
    """

    def __init__(
        self,
        model: LoadedModel,
        options: ServeOptions | None = None,
        *,
        writer: RecordWriter | None = None,
        reporter: Reporter | None = None,
    ) -> None:
        self.model = model
        self.options = options or ServeOptions()
        if self.options.max_batch < 1 or self.options.max_wait_ms < 0 or self.options.max_bytes < 1:
            raise ConfigError("max_batch and max_bytes must be at least 1, max_wait_ms at least 0")
        self.writer = writer
        self.reporter = reporter or Reporter(quiet=True)
        self.metrics = Metrics()
        self.drift = drift_monitor(model, self.options.drift_window)
        detector = model.detector
        self.checks = reliability_checks(model.metadata, detector.run_config)
        tiling = detector.run_config.common.tiling
        self.tiler = TiledPredictor(detector, tiling, self.options.max_batch) if tiling.enabled else None
        self.pending = 0
        self.ready = False
        self._queue: asyncio.Queue[_Job | None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._collector: asyncio.Task[None] | None = None

    # -- life cycle (the app's lifespan) -------------------------------------------------------

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        # One thread: the model scores one batch at a time (its own threads parallelise inside a batch).
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="surfaceinspect-inference")
        self._collector = asyncio.create_task(self._collect())
        self.ready = True

    async def stop(self) -> None:
        """Score what is queued, then stop the inference thread (the server has stopped taking requests)."""
        self.ready = False
        if self._queue is not None and self._collector is not None:
            await self._queue.put(None)
            await self._collector
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for check in self.checks:
            check.report(self.reporter)

    # -- micro-batching ------------------------------------------------------------------------

    async def submit(self, item: LoadedImage, name: str) -> ImageResult:
        """Score one decoded image with whatever other requests arrive within ``max_wait_ms``."""
        if self._queue is None or not self.ready:
            raise RequestError(503, "the service is not ready (starting or stopping); retry shortly")
        future: asyncio.Future[ImageResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(item, name, future))
        return await future

    async def _collect(self) -> None:
        """Take up to max_batch jobs (waiting at most max_wait_ms after the first), score them in the thread."""
        assert self._queue is not None
        queue, loop = self._queue, asyncio.get_running_loop()
        wait_s = self.options.max_wait_ms / 1000.0
        stopping = False
        while not stopping:
            first = await queue.get()
            if first is None:
                break
            jobs = [first]
            deadline = loop.time() + wait_s
            while len(jobs) < self.options.max_batch:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:  # Queue.get is safe to cancel: an item put meanwhile stays in the queue
                        job = await asyncio.wait_for(queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if job is None:  # stop: score this last batch first
                    stopping = True
                    break
                jobs.append(job)
            self.metrics.batch_sizes.observe(len(jobs))
            try:
                outcomes = await loop.run_in_executor(self._executor, self._score_jobs, jobs)
            except Exception as exc:  # noqa: BLE001 - the collector must outlive any failure
                outcomes = [exc] * len(jobs)
            for job, outcome in zip(jobs, outcomes, strict=True):
                if job.future.done():  # its client went away
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _score_jobs(self, jobs: list[_Job]) -> list[ImageResult | Exception]:
        """In the inference thread: one batch through the engine, then drift and records, in scoring order."""
        model = self.model
        try:
            results = list(
                score_batch(
                    [job.item for job in jobs],
                    [job.name for job in jobs],
                    model.detector,
                    self.tiler,
                    model.calibration,
                    model_id=model.model_id,
                    runtime=model.runtime,
                    checks=self.checks,
                )
            )
        except Exception as exc:  # noqa: BLE001 - answered as a 500; the service goes on
            if len(jobs) == 1:
                return [exc]
            # One image that breaks the model must not fail the others of its batch: score them one by one.
            return [self._score_jobs([job])[0] for job in jobs]
        outcomes: list[ImageResult | Exception] = []
        for result in results:
            try:
                self.drift.track(result.record, self.reporter)  # before writing: a drift warning is part of it
                if self.writer is not None:
                    self.writer.write(result.record)
                outcomes.append(result)
            except Exception as exc:  # noqa: BLE001 - e.g. the records disk is full: this request fails
                outcomes.append(exc)
        return outcomes

    # -- requests ------------------------------------------------------------------------------

    async def scored(self, request: Request, keep_original: bool) -> ImageResult:
        """Read, decode and score the image of ``request`` (a RequestError for a body that is no image)."""
        if not self.ready:
            raise RequestError(503, "the service is not ready (starting or stopping); retry shortly")
        if self.pending >= self.options.max_pending:
            raise RequestError(503, f"busy: {self.pending} requests in progress; retry shortly")
        self.pending += 1
        try:
            data, name = await self._read_image(request)
            # tiled models score each image at its own resolution
            size, resize = self.model.detector.input_size, self.tiler is None
            item = await run_in_threadpool(decode_image, data, name, size, keep_original, resize)
            if item.image is None:
                raise RequestError(422, f"{name}: {item.error}")
            result = await self.submit(item, name)
        finally:
            self.pending -= 1
        self.metrics.verdicts[result.record.verdict] = self.metrics.verdicts.get(result.record.verdict, 0) + 1
        return result

    async def _read_image(self, request: Request) -> tuple[bytes, str]:
        """The image's bytes and its record name, from a raw ``image/*`` body or a one-file multipart form."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "multipart/form-data" and not media.startswith("image/"):
            raise RequestError(
                415,
                f"content type {media or '(none)'} is not an image: send the image's bytes with Content-Type "
                "image/png (image/jpeg, image/tiff ...), or multipart/form-data with one file",
            )
        body = await self._read_body(request)
        name = request.headers.get(NAME_HEADER)
        if media == "multipart/form-data":
            body, filename = await self._form_file(request, body)
            name = filename or name
        if not body:
            raise RequestError(400, "empty body: send the image's bytes")
        return body, clean_name(name or "") or f"request-{uuid.uuid4().hex[:12]}"

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is known to exceed ``max_bytes`` (never read further)."""
        limit = self.options.max_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError(400, f"Content-Length {declared!r} is not a number") from None
            if size > limit:
                raise RequestError(413, _too_large(f"{size} bytes", limit))
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, _too_large(f"more than {limit} bytes", limit))
                chunks.append(chunk)
        except ClientDisconnect:
            raise RequestError(400, "the client disconnected before the body was complete") from None
        return b"".join(chunks)

    async def _form_file(self, request: Request, body: bytes) -> tuple[bytes, str | None]:
        """The one file of a multipart form (already read, within the size limit) and its file name."""

        async def replay() -> AsyncIterator[bytes]:
            yield body

        parser = MultiPartParser(request.headers, replay(), max_files=1, max_fields=16)
        parser.spool_max_size = self.options.max_bytes  # the body is within the limit: keep the file in memory
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise RequestError(400, f"multipart body: {exc.message}") from None
        except ValueError as exc:  # python-multipart's parse errors
            raise RequestError(400, f"multipart body is malformed ({exc})") from None
        try:
            files = [value for _key, value in form.multi_items() if not isinstance(value, str)]
            if len(files) != 1:
                raise RequestError(400, f"multipart body holds {len(files)} files; send exactly one image file")
            return await files[0].read(), files[0].filename
        finally:
            await form.close()

    def authorized(self, scope: Scope) -> bool:
        token = self.options.token
        if token is None or scope.get("path") in OPEN_PATHS:
            return True
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, given = value.partition(b" ")
                # compare_digest: the time taken does not tell how much of a guessed token was right
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token.encode())
        return False

    def internal_error(self, exc: BaseException, what: str) -> str:
        """Report an unexpected failure (one line, the traceback with ``debug``); returns the client's message."""
        message = f"internal error: {type(exc).__name__}: {exc}".replace("\n", " ")
        if isinstance(exc, SurfaceInspectError):
            message = str(exc).replace("\n", " ")
        self.reporter.warn(f"{what}: {message}")
        if self.options.debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        return message

    def health(self) -> dict[str, Any]:
        model = self.model
        return {
            "ready": self.ready,
            "model_id": model.model_id,
            "method": model.detector.name,
            "runtime": model.runtime,
            "threshold": model.calibration.image_threshold,
            "uptime_s": round(self.metrics.uptime(), 3),
            "pending": self.pending,
            "version": surfaceinspect.__version__,
        }


def decode_image(data: bytes, name: str, size: tuple[int, int], keep_original: bool, resize: bool) -> LoadedImage:
    """An image body as the loader of ``score`` delivers a file: decoded, checked, resized to the model's input."""
    return load_item(0, Path(name), lambda: read_image_bytes(data, name), size, keep_original, resize)


def _too_large(size: str, limit: int) -> str:
    return f"body is {size}, more than the {limit / MIB:.3g} MiB limit (--max-bytes)"


# ---------------------------------------------------------------------------------------------
# The ASGI app


class _Front:
    """Around every request: the token check, the metrics, and a 500 in JSON for anything unexpected."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = ENDPOINTS.get(scope.get("path", ""), "other")
        began = time.perf_counter()
        status = 500
        started = False

        async def send_and_note(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            if self.service.authorized(scope):
                await self.app(scope, receive, send_and_note)
            else:
                headers = {"WWW-Authenticate": 'Bearer realm="surfaceinspect"'}
                message = "missing or wrong token: send the header Authorization: Bearer TOKEN"
                await error_response(401, message, headers)(scope, receive, send_and_note)
        except Exception as exc:  # noqa: BLE001 - one request fails, never the service
            message = self.service.internal_error(exc, f"{scope.get('method')} {scope.get('path')}")
            if not started:
                await error_response(500, message)(scope, receive, send_and_note)
        finally:
            self.service.metrics.request(endpoint, status, time.perf_counter() - began)


def build_app(service: Service) -> Starlette:
    """The Starlette app of ``service``; its lifespan starts and stops the inference thread."""

    # A RequestError becomes its 4xx/5xx through the exception handler below; anything else a route
    # raises reaches _Front, which answers 500 and reports it: the service goes on either way.
    async def score(request: Request) -> Response:
        record = (await service.scored(request, keep_original=False)).record
        return Response(
            json.dumps(record.to_dict(), ensure_ascii=False) + "\n", media_type="application/json"
        )  # exactly the line `score` writes to a JSON Lines file

    async def heatmap(request: Request) -> Response:
        from surfaceinspect.analysis.rendering import encode_png

        result = await service.scored(request, keep_original=True)
        record = result.record
        if record.verdict == "error":
            raise RequestError(500, f"{record.path}: {record.error}")
        png = await run_in_threadpool(lambda: encode_png(overlay_image(result, service.model.calibration)))
        headers = {"X-Verdict": record.verdict, "X-Score": format_score(record.score)}
        return Response(png, media_type="image/png", headers=headers)

    async def health(_request: Request) -> Response:
        data = service.health()
        body = json.dumps(data) + "\n"
        return Response(body, status_code=200 if data["ready"] else 503, media_type="application/json")

    async def metrics(_request: Request) -> Response:
        return Response(service.metrics.render(service), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    async def request_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return error_response(exc.status, exc.message)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    return Starlette(
        routes=[
            Route("/score", score, methods=["POST"]),
            Route("/heatmap", heatmap, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        middleware=[Middleware(_Front, service=service)],
        exception_handlers={HTTPException: http_error, RequestError: request_error},
        lifespan=lifespan,
    )


# ---------------------------------------------------------------------------------------------
# Running it


def open_records(path: Path, model_dir: Path) -> RecordWriter:
    """The records file (``--records``), appended as ``watch`` appends: one flushed line per record, locked.

    An existing records file of surfaceinspect is continued; any other existing file is refused
    (never written over), as are the model's own files.
    """
    writer, _recorded, _fmt = open_records_for_append(
        path, None, model_dir, force=False, option="--records", force_option=None
    )
    return writer


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a one-line ConfigError.

    Bound here rather than by uvicorn, which would exit 1 (this tool's "defect" code) on a port in use.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port (or stop what uses it)"
        ) from None
    sock.set_inheritable(True)
    return sock


def run_server(service: Service, sock: socket.socket, access_log: bool = False) -> None:
    """Serve on ``sock`` until SIGINT or SIGTERM; requests in flight finish first (up to 30 s)."""
    import uvicorn

    config = uvicorn.Config(
        build_app(service),
        # The CLI prints what the operator needs; uvicorn's start-up lines would repeat it (access lines are INFO).
        log_level="info" if access_log else "warning",
        access_log=access_log,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits 3 when the app fails to start: not this tool's "unreadable" code
        if exc.code not in (0, None):
            raise RuntimeError(f"the HTTP server stopped at start-up (uvicorn exit {exc.code})") from None
