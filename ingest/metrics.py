"""Prometheus metrics of the ingest bridge."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["BridgeMetrics"]


class BridgeMetrics:
    """One registry per bridge, so tests can run several bridges in one process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "posflow_ingest_received", "MQTT messages received", ["kind"], registry=r
        )
        self.produced = Counter(
            "posflow_ingest_produced", "records acknowledged by Kafka", ["topic"], registry=r
        )
        self.dead_lettered = Counter(
            "posflow_ingest_dead_lettered",
            "messages sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.kafka_errors = Counter(
            "posflow_ingest_kafka_errors",
            "failed produce attempts (retried)",
            ["error"],
            registry=r,
        )
        self.inflight = Gauge(
            "posflow_ingest_inflight", "messages received and not yet acked by Kafka", registry=r
        )
        self.ready = Gauge("posflow_ingest_ready", "1 when MQTT and Kafka both work", registry=r)
        self.produce_latency = Histogram(
            "posflow_ingest_produce_latency_seconds",
            "from MQTT receipt to Kafka acknowledgement",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
