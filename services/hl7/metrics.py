"""Prometheus metrics of the order listener; labels carry message types, ACK codes and
close reasons, never identifiers or patient data."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CLOSE_REASONS = (
    "peer",
    "idle",
    "read_timeout",
    "oversized",
    "framing",
    "connection_cap",
    "shutdown",
)


class Hl7Metrics:
    """The listener's metrics, in a registry of their own (served on `MS_HL7_METRICS_PORT`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "marrowscope_hl7_messages_total",
            "Order messages answered, by message type (OML^O33, ORM^O01, other) and ACK code",
            ["type", "ack"],
            registry=self.registry,
        )
        self.open_connections = Gauge(
            "marrowscope_hl7_open_connections",
            "MLLP connections open now",
            registry=self.registry,
        )
        self.closed = Counter(
            "marrowscope_hl7_connections_closed_total",
            "MLLP connections closed, by reason (peer: the sender closed it)",
            ["reason"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "marrowscope_hl7_message_seconds",
            "Time from a whole message received to its ACK built (checks, inputs, job store)",
            ["type"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        for reason in CLOSE_REASONS:
            self.closed.labels(reason)
