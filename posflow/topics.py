"""The Kafka topics of the pipeline: names, partitions, retention and compaction.

One place for them, so the stack creates exactly what the services use.
Keys: terminal topics are keyed by terminal id (per-terminal order), money
topics by merchant id (per-merchant order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posflow.settings import KafkaSettings

__all__ = ["TopicNames", "TopicSpec", "pipeline_topics", "rekeyed_txn_topic", "topic_names"]

_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicNames:
    """The name of every pipeline topic, for one prefix (``pos`` -> ``pos.txn.v1``)."""

    telemetry: str
    txn: str
    status: str
    deadletter: str
    health: str
    terminal_state: str
    cashflow: str
    alerts: str
    integrity: str

    @classmethod
    def for_prefix(cls, prefix: str) -> TopicNames:
        return cls(
            telemetry=f"{prefix}.telemetry.v1",
            txn=f"{prefix}.txn.v1",
            status=f"{prefix}.status.v1",
            deadletter=f"{prefix}.deadletter.v1",
            health=f"{prefix}.health.v1",
            terminal_state=f"{prefix}.terminal-state.v1",
            cashflow=f"{prefix}.cashflow.v1",
            alerts=f"{prefix}.alerts.v1",
            integrity=f"{prefix}.integrity.v1",
        )

    def of_kind(self, kind: str) -> str:
        """The topic a terminal message of ``kind`` (telemetry, txn, status) travels on."""
        topics = {"telemetry": self.telemetry, "txn": self.txn, "status": self.status}
        if kind not in topics:
            raise ValueError(f"no topic for message kind {kind!r}; known: {sorted(topics)}")
        return topics[kind]


def topic_names(kafka: KafkaSettings) -> TopicNames:
    """The pipeline's topic names under ``kafka.topic_prefix``."""
    return TopicNames.for_prefix(kafka.topic_prefix)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


# TopicNames field, retention in days (None: compacted, the latest record per key), purpose
_TOPICS: tuple[tuple[str, int | None, str], ...] = (
    ("telemetry", 7, "terminal telemetry envelopes, keyed by terminal id"),
    ("txn", 30, "payment outcomes, keyed by merchant id"),
    ("status", None, "online/offline status, latest per terminal (compacted)"),
    ("deadletter", 30, "rejected input with reason code and redacted payload"),
    ("health", 7, "per-terminal health records, keyed by terminal id"),
    ("terminal_state", None, "current state per terminal (compacted)"),
    ("cashflow", 30, "merchant cash-flow events, keyed by merchant id"),
    ("alerts", 30, "alert lifecycle events, keyed by alert fingerprint"),
    (
        "integrity",
        30,
        "integrity events (e.g. a transaction id reused with another body), keyed by merchant",
    ),
)


def _config(retention_days: int | None) -> dict[str, str]:
    if retention_days is None:
        return {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
    return {
        "cleanup.policy": "delete",
        "min.insync.replicas": "1",
        "retention.ms": str(retention_days * _DAY_MS),
    }


def pipeline_topics(kafka: KafkaSettings) -> list[TopicSpec]:
    """Every topic posflow's services read or write, for one settings object."""
    names = topic_names(kafka)
    return [
        TopicSpec(getattr(names, field), kafka.default_partitions, _config(days), purpose)
        for field, days, purpose in _TOPICS
    ]


def rekeyed_txn_topic(app_id: str, partitions: int) -> TopicSpec:
    """The health workers' internal topic: payments re-keyed by terminal id, so they are
    co-partitioned with the terminal-keyed topics (``partitions`` must match theirs)."""
    return TopicSpec(
        f"{app_id}-txn",
        partitions,
        {"cleanup.policy": "delete", "retention.ms": str(_DAY_MS)},
        "payments re-keyed by terminal id, for the health workers (internal)",
    )
