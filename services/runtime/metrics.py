"""Prometheus metrics of one model service, served on their own HTTP port.

Labels are only model name, model version and a status word; request content, ids and
anything patient-related never become labels. Each ``RuntimeMetrics`` owns its registry so
that several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UNKNOWN = "unknown"  # label for model/version names that are not loaded (bounded cardinality)


class RuntimeMetrics:
    """The ``marrowscope_*`` metric families of the runtime."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "marrowscope_requests",
            "ModelInfer calls by outcome (ok or gRPC status name).",
            ["model", "version", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "marrowscope_request_seconds",
            "ModelInfer time from decode to encoded response.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "marrowscope_queue_seconds",
            "Time a request waited for the model thread/batch.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "marrowscope_compute_seconds",
            "preprocess+predict+postprocess time of the batch that served a request.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "marrowscope_batch_size",
            "Requests merged into one handler call.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "marrowscope_inflight_requests",
            "ModelInfer calls being processed.",
            ["model"],
            registry=r,
        )
        self.oversized = Counter(
            "marrowscope_oversized_messages",
            "gRPC messages refused for exceeding max_message_bytes: direction=received "
            "(requests gRPC refused while they arrived) or sent (replies refused before "
            "sending; also counted in marrowscope_requests_total as resource_exhausted).",
            ["direction"],
            registry=r,
        )
        for direction in ("received", "sent"):
            self.oversized.labels(direction)  # export zeros so rate() works from the start
        self.model_info = Gauge(
            "marrowscope_model_info",
            "1 for every loaded model version.",
            ["model", "version"],
            registry=r,
        )
        self._http: WSGIServer | None = None

    def set_loaded(self, model: str, version: str, loaded: bool) -> None:
        if loaded:
            self.model_info.labels(model, version).set(1)
        else:
            try:
                self.model_info.remove(model, version)
            except KeyError:
                log.debug("model_info had no series for %s/%s", model, version)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server in a daemon thread; returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def close(self) -> None:
        """Stop the endpoint without waiting: ``shutdown()`` blocks up to the server's
        0.5 s poll interval, time a service on its way out within its grace period lacks."""
        http, self._http = self._http, None
        if http is not None:

            def stop() -> None:
                http.shutdown()
                http.server_close()

            threading.Thread(target=stop, name="metrics-close", daemon=True).start()
