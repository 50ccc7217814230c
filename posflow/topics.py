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


def pipeline_topics(kafka: KafkaSettings) -> list[TopicSpec]:
    """Every topic posflow's services read or write, for one settings object."""
    p = kafka.topic_prefix
    n = kafka.default_partitions
    keep = {"cleanup.policy": "delete", "min.insync.replicas": "1"}
    compact = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
    return [
        TopicSpec(
            f"{p}.telemetry.v1",
            n,
            {**keep, "retention.ms": str(7 * _DAY_MS)},
            "terminal telemetry envelopes, keyed by terminal id",
        ),
        TopicSpec(
            f"{p}.txn.v1",
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "payment outcomes, keyed by merchant id",
        ),
        TopicSpec(
            f"{p}.status.v1",
            n,
            compact,
            "online/offline status, latest per terminal (compacted)",
        ),
        TopicSpec(
            f"{p}.deadletter.v1",
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "rejected input with reason code and redacted payload",
        ),
        TopicSpec(
            f"{p}.health.v1",
            n,
            {**keep, "retention.ms": str(7 * _DAY_MS)},
            "per-terminal health records, keyed by terminal id",
        ),
        TopicSpec(
            f"{p}.terminal-state.v1",
            n,
            compact,
            "current state per terminal (compacted)",
        ),
        TopicSpec(
            f"{p}.cashflow.v1",
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "merchant cash-flow events, keyed by merchant id",
        ),
        TopicSpec(
            f"{p}.alerts.v1",
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "alert lifecycle events, keyed by alert fingerprint",
        ),
        TopicSpec(
            f"{p}.integrity.v1",
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "integrity events (e.g. a transaction id reused with another body), keyed by merchant",
        ),
    ]
