"""Prometheus metrics of the health workers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["StreamMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("posflow_streams_events", "events processed", ["type"], registry=r)
        self.late = Counter("posflow_streams_late", "messages later than the grace", registry=r)
        self.replays = Counter(
            "posflow_streams_replays", "messages seen before (redelivery), ignored", registry=r
        )
        self.windows_closed = Counter(
            "posflow_streams_windows_closed", "health windows closed", registry=r
        )
        self.state_changes = Counter(
            "posflow_streams_state_changes", "online/offline changes", ["to"], registry=r
        )
        self.batch_seconds = Histogram(
            "posflow_streams_batch_seconds", "processing time of one batch",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.end_to_end = Histogram(
            "posflow_streams_end_to_end_seconds",
            "terminal timestamp of a window's last message to its health row committed",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sink_rows = Counter("posflow_streams_sink_rows", "rows written", ["table"], registry=r)
        self.refused = Counter(
            "posflow_streams_refused",
            "records refused to the dead-letter topic (reason: implausible_timestamp, ...)",
            ["reason"],
            registry=r,
        )
        self.changelog_records = Counter(
            "posflow_streams_changelog_records",
            "terminal states written to the table's changelog, by path "
            "(bulk: one batch per partition before a commit; faust: its per-key path)",
            ["path"],
            registry=r,
        )
        self.terminals = Gauge("posflow_streams_terminals", "terminals in local state", registry=r)
