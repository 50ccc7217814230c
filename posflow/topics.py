"""The Kafka topics of the pipeline: names, partitions, retention and compaction.

One place for them, so the stack creates exactly what the services use.
Keys: terminal topics are keyed by terminal id (per-terminal order), money
topics by merchant id (per-merchant order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posflow.settings import KafkaSettings

__all__ = ["TopicSpec", "pipeline_topics"]

_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


# name, retention in days (None: compacted, the latest record per key), purpose
_TOPICS: tuple[tuple[str, int | None, str], ...] = (
    ("telemetry", 7, "terminal telemetry envelopes, keyed by terminal id"),
    ("txn", 30, "payment outcomes, keyed by merchant id"),
    ("status", None, "online/offline status, latest per terminal (compacted)"),
    ("deadletter", 30, "rejected input with reason code and redacted payload"),
    ("health", 7, "per-terminal health records, keyed by terminal id"),
    ("terminal-state", None, "current state per terminal (compacted)"),
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
    return [
        TopicSpec(
            f"{kafka.topic_prefix}.{name}.v1", kafka.default_partitions, _config(days), purpose
        )
        for name, days, purpose in _TOPICS
    ]
