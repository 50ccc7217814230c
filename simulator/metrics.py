"""The simulator's Prometheus metrics, read at scrape time from the run's own counts.

Nothing is incremented on the hot path but plain integers: the collector reads the
counts and the transport's statistics when /metrics is scraped, so a fleet of
thousands of terminals pays nothing for being observed.

| metric | type | meaning |
|---|---|---|
| ``posflow_sim_published_total{kind}`` | counter | telemetry/txn/status handed to MQTT |
| ``posflow_sim_acknowledged_total`` | counter | QoS 1 PUBACKs from the broker |
| ``posflow_sim_expected_dead_letters_total`` | counter | malformed / card-number injections |
| ``posflow_sim_faults_started_total{kind}`` | counter | terminals a scheduled fault began on |
| ``posflow_sim_wills_total`` | counter | Last Wills (a fault took the terminal away) |
| ``posflow_sim_connect_failures_total`` | counter | refused or failed MQTT connects |
| ``posflow_sim_terminals_connected`` | gauge | terminals online over MQTT now |
| ``posflow_sim_terminals_total`` | gauge | terminals in the run |
| ``posflow_sim_queued_messages`` | gauge | waiting for a connection (offline buffers) |
| ``posflow_sim_simulated_seconds`` | gauge | run time reached, in simulated seconds |
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from simulator.engine import EXPECT_DUPLICATE, Message
from simulator.transport import TransportStats

__all__ = ["KINDS", "SimMetrics"]

KINDS = ("telemetry", "txn", "status")


@dataclass
class SimMetrics:
    """Counts of one run, and the registry that exposes them."""

    terminals_total: int
    published: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(KINDS, 0)))
    expected_dead_letters: int = 0
    duplicates: int = 0  # sent twice on purpose (a duplicate_messages fault)
    wills: int = 0
    faults_started: Counter[str] = field(default_factory=Counter)
    simulated_s: float = 0.0
    stats: TransportStats = field(default_factory=TransportStats)
    connected: Callable[[], int] = lambda: 0
    queued: Callable[[], int] = lambda: 0
    peak_connected: int = 0
    registry: CollectorRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))

    def on_sent(self, msg: Message) -> None:
        """Count one message handed to MQTT (or a will the broker publishes for it)."""
        self.published[msg.kind] += 1
        if msg.is_will:
            self.wills += 1
        if msg.expect.startswith("dl:"):
            self.expected_dead_letters += 1
        elif msg.expect == EXPECT_DUPLICATE:
            self.duplicates += 1

    def fault_started(self, kind: str, terminals: int) -> None:
        self.faults_started[kind] += terminals

    def sample_connected(self) -> int:
        now = self.connected()
        self.peak_connected = max(self.peak_connected, now)
        return now

    def counts(self) -> dict[str, object]:
        """The run's final counts (``posflow simulate --summary-json``; the main job reads it)."""
        return {
            "published": dict(self.published),
            "acknowledged": self.stats.acked,
            "expected_dead_letters": self.expected_dead_letters,
            "duplicates": self.duplicates,
            "wills": self.wills,
            "faults_started": dict(self.faults_started),
            "terminals": self.terminals_total,
            "peak_connected": self.peak_connected,
            "simulated_s": self.simulated_s,
        }

    @property
    def published_total(self) -> int:
        return sum(self.published.values())

    def summary(self) -> str:
        """The end-of-run line: the same numbers as the last /metrics."""
        kinds = ", ".join(f"{k} {self.published[k]:,}" for k in KINDS)
        faults = sum(self.faults_started.values())
        by_fault = ", ".join(f"{k} {n:,}" for k, n in sorted(self.faults_started.items()))
        st = self.stats
        return (
            f"published {self.published_total:,} ({kinds}), acknowledged {st.acked:,}, "
            f"expected dead letters {self.expected_dead_letters:,}, "
            f"faults started {faults:,}{f' ({by_fault})' if by_fault else ''}, "
            f"wills {self.wills:,}; terminals {self.terminals_total:,}, "
            f"peak connected {self.peak_connected:,}; {st.connects:,} connects, "
            f"{st.connect_failures:,} failed, {st.reconnects:,} reconnect attempts; "
            f"{self.simulated_s:,.0f} simulated s; errors {st.errors or 'none'}"
        )


class _Collector:
    def __init__(self, m: SimMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        published = CounterMetricFamily(
            "posflow_sim_published", "Messages handed to MQTT, by kind", labels=["kind"]
        )
        for kind in sorted(m.published):
            published.add_metric([kind], m.published[kind])
        yield published
        yield CounterMetricFamily(
            "posflow_sim_acknowledged", "QoS 1 PUBACKs received", value=m.stats.acked
        )
        yield CounterMetricFamily(
            "posflow_sim_expected_dead_letters",
            "Messages sent to be dead-lettered (malformed, card numbers)",
            value=m.expected_dead_letters,
        )
        faults = CounterMetricFamily(
            "posflow_sim_faults_started",
            "Terminals a scheduled fault began on, by fault kind",
            labels=["kind"],
        )
        for kind in sorted(m.faults_started):
            faults.add_metric([kind], m.faults_started[kind])
        yield faults
        yield CounterMetricFamily("posflow_sim_wills", "Last Wills published", value=m.wills)
        yield CounterMetricFamily(
            "posflow_sim_connect_failures",
            "MQTT connects refused or failed",
            value=m.stats.connect_failures,
        )
        yield GaugeMetricFamily(
            "posflow_sim_terminals_connected",
            "Terminals online over MQTT",
            value=m.sample_connected(),
        )
        yield GaugeMetricFamily(
            "posflow_sim_terminals_total", "Terminals in the run", value=m.terminals_total
        )
        yield GaugeMetricFamily(
            "posflow_sim_queued_messages",
            "Messages waiting for their terminal's connection",
            value=m.queued(),
        )
        yield GaugeMetricFamily(
            "posflow_sim_simulated_seconds", "Run time reached (simulated s)", value=m.simulated_s
        )
