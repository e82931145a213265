"""The service's ``GET /metrics``: counters and histograms in the Prometheus text exposition format.

Written by hand (a few dozen lines) rather than with prometheus_client: one process, no registry, no
multiprocess mode to configure.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from surfaceinspect.deploy.serve import Service

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out = [
            f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {count}"
            for bound, count in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_number(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items()) + "}"


def _escape(value: str) -> str:
    """A label value as the text format needs it: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """What ``GET /metrics`` reports; written by hand (the text format is a few lines, no dependency).

    Updated on the event loop's thread only (requests, verdicts, batch sizes), so it needs no lock.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.verdicts = {"good": 0, "defect": 0, "error": 0}
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.batch_sizes = Histogram((1, 2, 4, 8, 16, 32, 64, 128))

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
        if endpoint in ("score", "heatmap"):
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS_S)).observe(seconds)

    def errors_by_status(self) -> collections.Counter[int]:
        """Requests answered with a status of 400 or more, by status (summed over the endpoints)."""
        errors: collections.Counter[int] = collections.Counter()
        for (_endpoint, status), n in self.requests.items():
            if status >= 400:
                errors[status] += n
        return errors

    def render(self, service: Service) -> str:
        """The Prometheus text exposition (version 0.0.4) of the service's counters."""
        model = service.model
        info = {"model_id": model.model_id, "method": model.detector.name, "runtime": model.runtime}
        latency = "surfaceinspect_request_duration_seconds"
        families: list[tuple[str, str, str, list[str]]] = [
            ("model_info", "gauge", "The model served (always 1).", [_sample(info, 1)]),
            ("uptime_seconds", "gauge", "Seconds since the service started.", [_sample({}, self.uptime())]),
            (
                "verdicts_total",
                "counter",
                "Scored images by verdict (good, defect, error).",
                [_sample({"verdict": v}, n) for v, n in self.verdicts.items()],
            ),
            (
                "requests_total",
                "counter",
                "HTTP requests by endpoint and status.",
                [_sample({"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(self.requests.items())],
            ),
            (
                "request_errors_total",
                "counter",
                "HTTP requests answered with a status of 400 or more, by status.",
                [_sample({"status": str(s)}, n) for s, n in sorted(self.errors_by_status().items())],
            ),
            (
                "request_duration_seconds",
                "histogram",
                "Time from request to response of /score and /heatmap, by endpoint.",
                [line for e, h in sorted(self.latency.items()) for line in h.lines(latency, {"endpoint": e})],
            ),
            (
                "batch_size",
                "histogram",
                "Images per inference batch (requests of several clients are scored together).",
                self.batch_sizes.lines("surfaceinspect_batch_size", {}),
            ),
            (
                "pending_requests",
                "gauge",
                "Requests being read, decoded, queued or scored now.",
                [_sample({}, service.pending)],
            ),
        ]
        drift = service.drift
        if drift.available:  # a model without calibration scores has no drift check
            latest = drift.checks[-1] if drift.checks else None
            families += [
                (
                    "drift_checks_total",
                    "counter",
                    f"Drift checks done (one per {drift.window} good verdicts, see docs/drift.md).",
                    [_sample({}, len(drift.checks))],
                ),
                (
                    "drift_p_value",
                    "gauge",
                    "Mann-Whitney p-value of the latest drift check (NaN before the first).",
                    [_sample({}, latest.p_value if latest is not None else math.nan)],
                ),
                (
                    "drift_detected",
                    "gauge",
                    f"1 while the latest drift check found drift (p <= {drift.alpha:g}), else 0.",
                    [_sample({}, int(drift.alarm is not None))],
                ),
                (
                    "drift_window_scores",
                    "gauge",
                    "Good-verdict scores gathered towards the next drift check.",
                    [_sample({}, len(drift.scores))],
                ),
            ]
        lines: list[str] = []
        for name, kind, text, samples in families:
            full = f"surfaceinspect_{name}"
            lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
            # histograms come with their full names; other samples get theirs here
            lines += samples if kind == "histogram" else [full + sample for sample in samples]
        return "\n".join(lines) + "\n"

    def uptime(self) -> float:
        return time.monotonic() - self.started


def _sample(labels: dict[str, str], value: float) -> str:
    """A sample without its metric name: ``{labels} value``."""
    return f"{_labels(labels)} {_number(value)}"
