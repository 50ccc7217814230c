"""The Kafka topics of the pipeline: names, partitions, retention and compaction.

One place for them, so the stack creates exactly what the services use.
Keys: terminal topics are keyed by terminal id (per-terminal order), money
topics by merchant id (per-merchant order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from posflow.settings import KafkaSettings

__all__ = ["TopicKind", "TopicSpec", "pipeline_topics", "topic_name"]

TopicKind = Literal[
    "telemetry",
    "txn",
    "status",
    "deadletter",
    "health",
    "terminal-state",
    "cashflow",
    "alerts",
    "integrity",
]

_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


def topic_name(kafka: KafkaSettings, kind: TopicKind) -> str:
    """The full name of one of the pipeline's topics, e.g. ``posflow.txn.v1``."""
    return f"{kafka.topic_prefix}.{kind}.v1"


def pipeline_topics(kafka: KafkaSettings) -> list[TopicSpec]:
    """Every topic posflow's services read or write, for one settings object."""
    n = kafka.default_partitions
    keep = {"cleanup.policy": "delete", "min.insync.replicas": "1"}
    compact = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
    return [
        TopicSpec(
            topic_name(kafka, "telemetry"),
            n,
            {**keep, "retention.ms": str(7 * _DAY_MS)},
            "terminal telemetry envelopes, keyed by terminal id",
        ),
        TopicSpec(
            topic_name(kafka, "txn"),
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "payment outcomes, keyed by merchant id",
        ),
        TopicSpec(
            topic_name(kafka, "status"),
            n,
            compact,
            "online/offline status, latest per terminal (compacted)",
        ),
        TopicSpec(
            topic_name(kafka, "deadletter"),
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "rejected input with reason code and redacted payload",
        ),
        TopicSpec(
            topic_name(kafka, "health"),
            n,
            {**keep, "retention.ms": str(7 * _DAY_MS)},
            "per-terminal health records, keyed by terminal id",
        ),
        TopicSpec(
            topic_name(kafka, "terminal-state"),
            n,
            compact,
            "current state per terminal (compacted)",
        ),
        TopicSpec(
            topic_name(kafka, "cashflow"),
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "merchant cash-flow events, keyed by merchant id",
        ),
        TopicSpec(
            topic_name(kafka, "alerts"),
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "alert lifecycle events, keyed by alert fingerprint",
        ),
        TopicSpec(
            topic_name(kafka, "integrity"),
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "integrity events (e.g. a transaction id reused with another body), keyed by merchant",
        ),
    ]
