"""Per-request telemetry: one structured JSON log line per request, and Prometheus metrics.

Every request gets a :class:`RequestRecord` on arrival. Services fill in what
they know (model, characters, audio seconds) and add one child event per turn
(latency, characters); when the answer has gone out, the app writes the record
as one JSON line to stdout (logger ``converse.requests``) and, when enabled,
counts it in the metrics. A record never holds an API key: only the key id
(first 16 hex digits of its SHA-256).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from handler.services.admission import Admission

REQUEST_LOGGER = "converse.requests"
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0)


@dataclass
class RequestRecord:
    """What one request did, for its log line.

    Attributes:
        request_id: the request's id (as in ``X-Request-ID``).
        method: HTTP method.
        path: the URL path.
        started: ``time.monotonic()`` at arrival, seconds.
        route: the matched route template (e.g. ``/v1/voices/{voice_id}``), '' when none.
        status: HTTP status answered (0 until known).
        key_id: the caller's key id, '' before authentication.
        model: the model that served it, '' when none.
        characters: text characters the request carried.
        input_audio_s: seconds of audio the request carried.
        output_audio_s: seconds of audio answered.
        error_code: the error's code, '' on success.
        error_detail: operator-only detail of the error (never sent to the client).
        turns: per-turn child events (``turn_index``, ``stage``, ``latency_ms``, ...).
    """

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    route: str = ""
    status: int = 0
    key_id: str = ""
    model: str = ""
    characters: int = 0
    input_audio_s: float = 0.0
    output_audio_s: float = 0.0
    error_code: str = ""
    error_detail: str = ""
    turns: list[dict[str, Any]] = field(default_factory=list)

    def turn(self, turn_index: int, stage: str, started: float, **fields: Any) -> None:
        """Add a child event for one turn's stage that began at ``started`` (monotonic s)."""
        latency_ms = round((time.monotonic() - started) * 1000, 1)
        self.turns.append(
            {"turn_index": turn_index, "stage": stage, "latency_ms": latency_ms, **fields}
        )

    def line(self) -> str:
        """The record as one JSON object (no newline)."""
        return json.dumps(
            {
                "event": "request",
                "request_id": self.request_id,
                "method": self.method,
                "route": self.route or self.path,
                "status": self.status,
                "latency_ms": round((time.monotonic() - self.started) * 1000, 1),
                "key_id": self.key_id or None,
                "model": self.model or None,
                "characters": self.characters,
                "input_audio_seconds": round(self.input_audio_s, 3),
                "output_audio_seconds": round(self.output_audio_s, 3),
                "error_code": self.error_code or None,
                "error_detail": self.error_detail or None,
                "turns": sorted(self.turns, key=lambda t: (t["turn_index"], t["stage"])),
            },
            separators=(",", ":"),
        )


class _Stdout:
    """Whatever ``sys.stdout`` is when a line is written (it may be replaced after startup)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def request_logger() -> logging.Logger:
    """The ``converse.requests`` logger, writing bare JSON lines to stdout."""
    logger = logging.getLogger(REQUEST_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(_Stdout())
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class Metrics:
    """Prometheus request metrics of one app (own registry, so apps do not share counters).

    Args:
        admission: the app's admission control; its running and waiting counts
            are read when the metrics are scraped, so a scrape sees the load of
            that moment (requests still running included), not the load when
            the last request ended.
    """

    def __init__(self, admission: Admission) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "converse_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "converse_request_seconds",
            "Time from arrival to answer, seconds.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.characters = Counter(
            "converse_input_characters", "Text characters voiced.", registry=self.registry
        )
        self.audio = Counter(
            "converse_output_audio_seconds", "Seconds of audio answered.", registry=self.registry
        )
        self.running = Gauge(
            "converse_admission_running", "Inference requests running.", registry=self.registry
        )
        self.waiting = Gauge(
            "converse_admission_waiting",
            "Inference requests waiting for a slot.",
            registry=self.registry,
        )
        self.running.set_function(lambda: admission.active)
        self.waiting.set_function(lambda: admission.waiting)

    def observe(self, record: RequestRecord) -> None:
        """Count one answered request."""
        route = record.route or "unmatched"
        self.requests.labels(route, str(record.status)).inc()
        self.latency.labels(route).observe(time.monotonic() - record.started)
        self.characters.inc(record.characters)
        self.audio.inc(record.output_audio_s)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
