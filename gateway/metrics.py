"""Prometheus metrics of the gateway, in a registry of its own (tests and the demo build several),
served over HTTP with the health endpoints beside them."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from gateway.health import Health

# Handling latency is sub-millisecond on the hot path; the upper buckets catch disk stalls.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "mp169_requests",
            "Service Requests by SRV category and decision.",
            ["category", "decision"],
            registry=self.registry,
        )
        self.alerts = Counter(
            "mp169_alerts",
            "Device and DCC alerts by category and delivery (deliver, withhold, reject).",
            ["category", "delivery"],
            registry=self.registry,
        )
        self.device_responses = Counter(
            "mp169_device_responses",
            "Device responses by delivery (deliver, withhold, reject, late, duplicate).",
            ["delivery"],
            registry=self.registry,
        )
        self.flag_requests = Counter(
            "mp169_flag_requests",
            "MP169 flag Service Requests by action and outcome.",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.deadletters = Counter(
            "mp169_deadletters",
            "Messages sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "mp169_duplicate_requests",
            "Requests whose RequestID was already accepted (redelivered ones were answered before).",
            ["redelivered"],
            registry=self.registry,
        )
        self.timeouts = Counter(
            "mp169_device_timeouts",
            "Forwarded requests without a device answer in time.",
            registry=self.registry,
        )
        self.commit_failures = Counter(
            "mp169_commit_failures",
            "Requests whose commit failed: answered STORE_FAILED, routing state rolled back.",
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "mp169_store_commit_seconds",
            "Duration of one store transaction of routing state (flag events and RequestID counters).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.commit_seconds_max = Gauge(
            "mp169_store_commit_seconds_max",
            "The longest store transaction of routing state since the gateway started (the histogram's "
            "buckets are too coarse for a bound that rests on it: README, Fair sessions).",
            registry=self.registry,
        )
        self._longest_commit = 0.0
        self.commit_batch_size = Histogram(
            "mp169_store_commit_batch_size",
            "Messages whose routing state one store transaction made durable.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.latency = Histogram(
            "mp169_request_handling_seconds",
            "Time from receiving a request to handing its forward or answer to the broker.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "mp169_inflight_requests", "Requests received and not yet acknowledged.", registry=self.registry
        )
        self.reconnects = Counter(
            "mp169_broker_reconnects", "Reconnections to the MQTT broker.", registry=self.registry
        )
        self.outcome_records_buffered = Gauge(
            "mp169_outcome_records_buffered",
            "Outcome records waiting in memory to be written.",
            registry=self.registry,
        )
        self.outcome_records_dropped = Counter(
            "mp169_outcome_records_dropped",
            "Outcome records dropped, oldest first, because the buffer was full (outcome file unwritable).",
            registry=self.registry,
        )
        self.outcome_write_failures = Counter(
            "mp169_outcome_write_failures",
            "Failed attempts to write a batch of outcome records (each retried).",
            registry=self.registry,
        )
        self.signature_verification = Gauge(
            "mp169_signature_verification_enabled",
            "1 if inbound Service Requests' XML signatures are verified; 0 if configuration turned it off.",
            registry=self.registry,
        )
        self.signature_checks = Counter(
            "mp169_signature_checks",
            "Inbound Service Requests' signature checks, by result (verified, or why not).",
            ["result"],
            registry=self.registry,
        )

        # labels() costs a lock and a dict build per call; the hot path reuses the children.
        self._request_counters: dict[tuple[str, str], Counter] = {}

    def count_request(self, category: str, decision: str) -> None:
        counter = self._request_counters.get((category, decision))
        if counter is None:
            counter = self.requests.labels(category=category, decision=decision)
            self._request_counters[category, decision] = counter
        counter.inc()

    def observe_commit(self, seconds: float, batch: int) -> None:
        """One store commit of `batch` messages' routing state that took `seconds`."""
        self.commit_seconds.observe(seconds)
        self.commit_batch_size.observe(batch)
        if seconds > self._longest_commit:
            self._longest_commit = seconds
            self.commit_seconds_max.set(seconds)

    def serve(self, port: int, health: Health | None = None) -> MetricsServer:
        """Serve /metrics (and, given `health`, /healthz and /readyz) on 127.0.0.1:port in a thread.

        OSError if the port cannot be bound (in use): the caller names the setting.
        """
        return MetricsServer(port, _routes(make_wsgi_app(self.registry), health))


class _ThreadingServer(WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes and probes every few seconds: not worth a log line each."""


class MetricsServer:
    """The HTTP endpoint, in a daemon thread; `close()` stops it and frees the port."""

    def __init__(self, port: int, app: Any) -> None:
        self._server = make_server("127.0.0.1", port, app, _ThreadingServer, handler_class=_QuietHandler)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="mp169-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _routes(metrics_app: Any, health: Health | None) -> Any:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if health is None or path not in {"/healthz", "/readyz"}:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        problem = (None if health.live() else "event loop not running") if path == "/healthz" else None
        if path == "/readyz":
            problem = health.not_ready_because()
        body = f"{problem or 'ok'}\n".encode()
        status = "503 Service Unavailable" if problem else "200 OK"
        start_response(
            status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app
