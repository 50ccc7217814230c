"""What the settlement worker counts and measures, under ``posflow_settlement_*``."""

from __future__ import annotations

import time
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from posflow.storage.ledger import LedgerResult

__all__ = ["SettlementMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class SettlementMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.ledger_writes = Counter(
            "posflow_settlement_ledger_writes", "new ledger rows", ["effect"], registry=r
        )
        self.duplicates = Counter(
            "posflow_settlement_duplicates_refused", "replayed transaction ids ignored", registry=r
        )
        self.quarantined = Counter(
            "posflow_settlement_quarantined", "reused ids with another body", registry=r
        )
        self.flagged = Counter(
            "posflow_settlement_flagged", "transactions recorded, not applied", registry=r
        )
        self.records = Counter(
            "posflow_settlement_records",
            "payment records decided: new ledger rows, replays, quarantined (posflow.cost)",
            registry=r,
        )
        self.invalid = Counter(
            "posflow_settlement_invalid_records", "records sent to the dead-letter topic",
            ["reason"], registry=r,
        )  # fmt: skip
        self.cashflow_events = Counter(
            "posflow_settlement_cashflow_events", "cash-flow events written", ["kind"], registry=r
        )
        self.published = Counter(
            "posflow_settlement_published", "records acknowledged by Kafka", ["topic"], registry=r
        )
        self.publish_errors = Counter(
            "posflow_settlement_publish_errors", "failed sends (retried by the outbox)", registry=r
        )
        self.end_to_end = Histogram(
            "posflow_settlement_end_to_end_seconds",
            "bridge received the payment (envelope received_at) to its cash-flow event committed",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_to_cashflow = Histogram(
            "posflow_settlement_publish_to_cashflow_seconds",
            "the terminal's payment timestamp (its publish, on the terminal's clock) to its "
            "cash-flow event committed",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "posflow_settlement_batch_seconds", "one ledger batch: decide and commit",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.last_batch = Gauge(
            "posflow_settlement_last_batch_timestamp", "unix time of the last batch", registry=r
        )

    def observe_batch(self, result: LedgerResult, committed: datetime, seconds: float) -> None:
        """One committed ledger batch: what it wrote, and how long its payments took."""
        self.batch_seconds.observe(seconds)
        self.last_batch.set(time.time())
        self.records.inc(result.applied + result.duplicates + len(result.quarantined))
        self.duplicates.inc(result.duplicates)
        self.quarantined.inc(len(result.quarantined))
        self.flagged.inc(len(result.flagged))
        self.ledger_writes.labels("parked").inc(result.parked)
        self.ledger_writes.labels("flagged").inc(len(result.flagged))
        for ev in result.events:
            self.cashflow_events.labels(ev.kind).inc()
            if ev.received_at is not None:  # a payment's own event (not a release)
                self.end_to_end.observe((committed - ev.received_at).total_seconds())
                self.publish_to_cashflow.observe(
                    max(0.0, (committed - ev.occurred_at).total_seconds())
                )
        moved = sum(1 for ev in result.events if ev.kind not in ("flagged",))
        self.ledger_writes.labels("applied").inc(moved)
        other = result.applied - moved - len(result.flagged) - result.parked
        self.ledger_writes.labels("no_money").inc(max(other, 0))
