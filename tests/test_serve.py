"""``surfaceinspect serve`` (issue #31): the HTTP service answers what ``score`` and ``heatmap`` write.

One toy model is trained for the module; each test builds its own service around it (fresh metrics)
and talks to it through Starlette's TestClient, which runs the app's lifespan (the inference thread).
One test runs the real command in a process and stops it with SIGTERM.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest
from PIL import Image
from service_process import free_port, serve_process
from starlette.testclient import TestClient
from typer.testing import CliRunner

from surfaceinspect import engine
from surfaceinspect.cli import app, serve as serve_cli
from surfaceinspect.config import PROFILES_ENV
from surfaceinspect.deploy.serve import (
    DEFAULT_HOST,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PENDING,
    DEFAULT_PORT,
    TOKEN_ENV,
    ServeOptions,
    Service,
    build_app,
    open_records,
)
from surfaceinspect.detectors import PLUGINS_ENV
from surfaceinspect.errors import EXIT_OK, EXIT_USAGE, OutputError

TESTS_DIR = Path(__file__).resolve().parent
TOY_PROFILE = (
    "method: toy\ncommon:\n  image_size: 64\n  batch_size: 4\n  workers: 0\n"
    "  calibration:\n    min_images: 4\n    fraction: 0.2\ntoy:\n  epochs: 2\n"
)


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, synthetic_dataset) -> Path:
    """A toy model trained once for the module (tests load it with the ``toy_method`` fixture)."""
    root = tmp_path_factory.mktemp("serve_model")
    (root / "profiles").mkdir()
    (root / "profiles" / "toy-cpu.yaml").write_text(TOY_PROFILE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PROFILES_ENV, str(root / "profiles"))
        patch.setenv(PLUGINS_ENV, "toy=toy_detector:ToyDetector")
        patch.setenv("SURFACEINSPECT_HOME", str(root / "home"))
        good = synthetic_dataset / "train" / "good"
        result = run_cli(
            "train", "--no-export", "-m", "toy", "-p", "cpu", good, "--seed", "0", "-q", "--out", root / "run"
        )
        assert result.exit_code == EXIT_OK, result.output
    return root / "run"


@pytest.fixture
def loaded(toy_method, toy_run):
    return engine.load(toy_run, device="cpu")


@pytest.fixture
def images(synthetic_dataset) -> dict[str, Path]:
    test = synthetic_dataset / "test"
    return {"good": test / "good" / "000.png", "good1": test / "good" / "001.png", "dent": test / "dent" / "000.png"}


@contextmanager
def serving(model, **options):
    """A service around ``model`` and a TestClient talking to it (the lifespan runs: the worker is up)."""
    writer = options.pop("writer", None)
    service = Service(model, ServeOptions(**options), writer=writer)
    with TestClient(build_app(service)) as client:
        yield client, service


def post_image(client, path: Path, endpoint: str = "/score", **headers):
    return client.post(endpoint, content=path.read_bytes(), headers={"Content-Type": "image/png", **headers})


def without_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "time"}


def assert_same_record(served: dict, written: dict) -> None:
    assert set(served) == set(written)
    for key in served:
        if isinstance(written[key], float):
            assert served[key] == pytest.approx(written[key], rel=1e-5, abs=1e-6), key
        elif key != "time":
            assert served[key] == written[key], key


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample of a Prometheus text exposition (and checks its syntax)."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) surfaceinspect_\w+ .+", line), line
            continue
        match = re.fullmatch(r'(surfaceinspect_\w+(?:\{(?:\w+="[^"]*",?)*\})?) (\S+)', line)
        assert match, line
        samples[match.group(1)] = float(match.group(2))
    return samples


def test_score_answers_the_record_score_writes(loaded, toy_run, images, tmp_path):
    with serving(loaded) as (client, _service):
        for key, verdict in (("good", "good"), ("dent", "defect")):
            response = post_image(client, images[key], **{"X-Image-Name": images[key].name})
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("application/json")
            assert response.text.endswith("}\n") and response.text.count("\n") == 1  # one JSON Lines record
            served = response.json()
            out = tmp_path / f"{key}.jsonl"
            result = run_cli("score", images[key], "--model", toy_run, "-o", out, "--no-fail-on-defect", "-q")
            assert result.exit_code == EXIT_OK, result.output
            (written,) = [json.loads(line) for line in out.read_text().splitlines()]
            assert served["verdict"] == written["verdict"] == verdict
            assert_same_record(served, written)
            assert served["path"] == images[key].name and served["model_id"] == loaded.model_id


def test_multipart_upload_heatmap_png_and_generated_names(loaded, images):
    with serving(loaded) as (client, _service):
        files = {"file": ("lot 7/part.png", images["dent"].read_bytes(), "image/png")}
        response = client.post("/score", files=files)
        assert response.status_code == 200, response.text
        assert response.json()["path"] == "lot 7/part.png"  # the form's file name
        anonymous = post_image(client, images["good"]).json()["path"]
        assert re.fullmatch(r"request-[0-9a-f]{12}", anonymous)

        heat = client.post("/heatmap", files={"file": ("dent.png", images["dent"].read_bytes(), "image/png")})
        assert heat.status_code == 200, heat.text
        assert heat.headers["content-type"] == "image/png" and heat.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert heat.headers["x-verdict"] == "defect"
        overlay = Image.open(io.BytesIO(heat.content))
        assert overlay.size == Image.open(images["dent"]).size and overlay.mode == "RGB"


def test_health_and_metrics_count_verdicts_latency_errors_and_drift(loaded, images):
    with serving(loaded) as (client, _service):
        health = client.get("/health")
        assert health.status_code == 200
        data = health.json()
        assert data["ready"] is True and data["model_id"] == loaded.model_id
        assert data["method"] == "toy" and data["runtime"] == "torch" and data["uptime_s"] >= 0
        for key in ("good", "good1", "dent"):
            assert post_image(client, images[key]).status_code == 200
        assert client.post("/score", content=b"", headers={"Content-Type": "image/png"}).status_code == 400
        assert client.get("/nowhere").status_code == 404
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        metrics = parse_metrics(response.text)
    assert metrics['surfaceinspect_verdicts_total{verdict="good"}'] == 2
    assert metrics['surfaceinspect_verdicts_total{verdict="defect"}'] == 1
    assert metrics['surfaceinspect_request_duration_seconds_count{endpoint="score"}'] == 4
    assert metrics['surfaceinspect_request_duration_seconds_bucket{endpoint="score",le="+Inf"}'] == 4
    assert metrics['surfaceinspect_requests_total{endpoint="score",status="200"}'] == 3
    assert metrics['surfaceinspect_request_errors_total{status="400"}'] == 1
    assert metrics['surfaceinspect_request_errors_total{status="404"}'] == 1
    assert metrics["surfaceinspect_batch_size_count"] == 3  # one image per batch: the requests came one by one
    assert metrics["surfaceinspect_drift_checks_total"] == 0  # the toy keeps its calibration scores: monitored
    assert metrics["surfaceinspect_drift_window_scores"] == 2  # the two good verdicts
    assert math.isnan(metrics["surfaceinspect_drift_p_value"])
    info = f'surfaceinspect_model_info{{model_id="{loaded.model_id}",method="toy",runtime="torch"}}'
    assert metrics[info] == 1


def test_concurrent_requests_are_scored_as_one_batch(loaded, images):
    """The first batch is held in the model until all the others wait in the queue; they then go as one batch."""
    n = 6
    sizes: list[int] = []
    release = threading.Event()
    predict = loaded.detector.predict

    def gated_predict(batch):
        sizes.append(int(batch.shape[0]))
        if len(sizes) == 1:
            assert release.wait(60), "the test never released the first batch"
        return predict(batch)

    loaded.detector.predict = gated_predict
    with serving(loaded, max_batch=8, max_wait_ms=0) as (client, service):
        responses: list = [None] * n

        def send(i: int) -> None:
            responses[i] = post_image(client, images["good" if i % 2 else "dent"])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while not (sizes and service._queue is not None and service._queue.qsize() == n - sizes[0]):
            assert time.monotonic() < deadline, f"batches {sizes}, queued {service._queue.qsize()}"
            time.sleep(0.01)
        release.set()
        for thread in threads:
            thread.join(60)
        metrics = parse_metrics(client.get("/metrics").text)
    assert [r.status_code for r in responses] == [200] * n
    assert sizes == [sizes[0], n - sizes[0]] and sum(sizes) == n  # two forward passes for six requests
    assert metrics["surfaceinspect_batch_size_count"] == 2
    verdicts = [r.json()["verdict"] for r in responses]
    assert verdicts == ["defect" if i % 2 == 0 else "good" for i in range(n)]  # each client got its own record


def test_bad_bodies_get_a_one_line_json_4xx_and_the_service_goes_on(loaded, images):
    png = images["good"].read_bytes()
    tiny = io.BytesIO()
    Image.new("RGB", (2, 2)).save(tiny, format="PNG")
    bad = [
        (b"", "image/png", 400, "empty"),
        (b"this is not an image", "image/png", 422, "not an image"),
        (png[: len(png) // 2], "image/png", 422, "truncated"),
        (tiny.getvalue(), "image/png", 422, "too small"),
        (png, "text/plain", 415, "not an image"),
        (png, None, 415, "not an image"),
        (b"--x\r\nnot a form", "multipart/form-data; boundary=x", 400, "multipart"),
        (b"garbage", "multipart/form-data", 400, "multipart"),
    ]
    with serving(loaded) as (client, _service):
        for body, content_type, status, words in bad:
            headers = {"Content-Type": content_type} if content_type else {}
            response = client.post("/score", content=body, headers=headers)
            assert response.status_code == status, (content_type, response.text)
            assert response.text.count("\n") == 1 and words in response.json()["error"], response.text
            assert post_image(client, images["good"]).status_code == 200  # still serving
        two = [("a", ("a.png", png, "image/png")), ("b", ("b.png", png, "image/png"))]
        response = client.post("/score", files=two)
        assert response.status_code == 400 and "file" in response.json()["error"]
        response = client.post("/score", files={"note": (None, b"a field, no file")})
        assert response.status_code == 400 and "0 files" in response.json()["error"]
        assert client.get("/score").status_code == 405 and "error" in client.get("/score").json()


def test_a_failure_in_the_model_is_a_500_for_that_request_only(loaded, images):
    predict = loaded.detector.predict
    calls = []

    def failing_once(batch):
        calls.append(batch.shape[0])
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return predict(batch)

    loaded.detector.predict = failing_once
    with serving(loaded) as (client, _service):
        response = post_image(client, images["good"])
        assert response.status_code == 500 and response.text.count("\n") == 1
        assert "simulated failure" in response.json()["error"]
        assert post_image(client, images["good"]).status_code == 200
        metrics = parse_metrics(client.get("/metrics").text)
    assert metrics['surfaceinspect_request_errors_total{status="500"}'] == 1


def test_size_limit_refuses_large_bodies_declared_or_streamed(loaded, images):
    png = images["good"].read_bytes()
    with serving(loaded, max_bytes=len(png) - 1) as (client, _service):
        response = post_image(client, images["good"])
        assert response.status_code == 413 and "limit" in response.json()["error"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            yield png[:1000]
            yield png[1000:]

        response = client.post("/score", content=chunks(), headers={"Content-Type": "image/png"})
        assert response.status_code == 413, response.text
    with serving(loaded, max_bytes=len(png)) as (client, _service):
        assert post_image(client, images["good"]).status_code == 200


def test_token_is_required_everywhere_but_health(loaded, images):
    token = "s3cret-token-of-some-length"
    with serving(loaded, token=token) as (client, _service):
        assert client.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            response = post_image(client, images["good"], **headers)
            assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
            assert "token" in response.json()["error"]
            assert client.get("/metrics", headers=headers).status_code == 401
        assert post_image(client, images["good"], Authorization=f"Bearer {token}").status_code == 200
        assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_records_are_appended_and_a_foreign_file_is_refused(loaded, toy_run, images, tmp_path):
    out = tmp_path / "served.jsonl"
    for round_ in range(2):  # a restart continues the file
        writer = open_records(out, toy_run)
        try:
            with serving(loaded, writer=writer) as (client, _service):
                served = [post_image(client, images[k], **{"X-Image-Name": k}).json() for k in ("good", "dent")]
                assert client.post("/heatmap", content=images["good"].read_bytes(), headers={
                    "Content-Type": "image/png", "X-Image-Name": "heat"}).status_code == 200  # fmt: skip
        finally:
            writer.close()
        lines = out.read_text().splitlines()
        assert len(lines) == 3 * (round_ + 1)
        assert [without_time(json.loads(line)) for line in lines[-3:-1]] == [without_time(r) for r in served]
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text("my own notes\n")
    with pytest.raises(OutputError, match="not written by surfaceinspect"):
        open_records(foreign, toy_run)
    assert foreign.read_text() == "my own notes\n"


def test_cli_defaults_and_refusals(toy_method, toy_run, tmp_path, monkeypatch):
    # the CLI repeats the service's defaults (importing it would load torch for every command)
    assert (serve_cli.DEFAULT_HOST, serve_cli.DEFAULT_PORT) == (DEFAULT_HOST, DEFAULT_PORT)
    assert (serve_cli.DEFAULT_MAX_BYTES, serve_cli.DEFAULT_MAX_PENDING) == (DEFAULT_MAX_BYTES, DEFAULT_MAX_PENDING)
    assert serve_cli.TOKEN_ENV == TOKEN_ENV
    options = ServeOptions()
    assert (options.max_batch, options.max_wait_ms) == (serve_cli.DEFAULT_MAX_BATCH, serve_cli.DEFAULT_MAX_WAIT_MS)

    result = run_cli("serve", "--help")
    assert result.exit_code == EXIT_OK and "--max-batch" in result.output and "--token-file" in result.output

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        result = run_cli("serve", "--model", toy_run, "--port", taken.getsockname()[1])
    finally:
        taken.close()
    assert result.exit_code == EXIT_USAGE and "choose another --port" in result.output
    empty = tmp_path / "token"
    empty.write_text("\n")
    result = run_cli("serve", "--model", toy_run, "--port", 0, "--token-file", empty)
    assert result.exit_code == EXIT_USAGE and "is empty" in result.output
    assert result.output.count("\n") == 1


def test_real_server_stops_on_sigterm_with_exit_0(toy_run, images, tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "toy-cpu.yaml").write_text(TOY_PROFILE)
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("a-token-long-enough-for-no-warning\n")
    token_file.chmod(0o600)
    records = tmp_path / "records.jsonl"
    command = [sys.executable, str(TESTS_DIR / "cli_with_toy.py"), "serve", "--model", str(toy_run),
               "--port", str(port), "--token-file", str(token_file), "--records", str(records)]  # fmt: skip
    env = {**os.environ, "TOY_PROFILES": str(profiles), "PYTHONPATH": str(TESTS_DIR.parent)}
    env.pop(TOKEN_ENV, None)
    with serve_process(command, env, port) as served:
        auth = {"Authorization": "Bearer a-token-long-enough-for-no-warning", "Content-Type": "image/png"}
        response = httpx2.post(f"{served.base}/score", content=images["dent"].read_bytes(), headers=auth, timeout=60)
        assert response.status_code == 200 and response.json()["verdict"] == "defect"
    err = served.stderr
    assert served.proc.returncode == EXIT_OK, err
    assert "serving on http://127.0.0.1:" in err and "stopped by SIGTERM" in err and "1 defect" in err
    (line,) = records.read_text().splitlines()
    assert json.loads(line)["verdict"] == "defect"
