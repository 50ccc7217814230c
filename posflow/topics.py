"""The Kafka topics of the pipeline: names, partitions, retention and compaction.

One place for them, so the stack creates exactly what the services use.
Keys: terminal topics are keyed by terminal id (per-terminal order), money
topics by merchant id (per-merchant order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posflow.settings import KafkaSettings

__all__ = ["TopicNames", "TopicSpec", "pipeline_topics", "topic_names"]

_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    purpose: str = ""


@dataclass(frozen=True)
class TopicNames:
    """The name of every pipeline topic under one prefix: the one place they are spelled."""

    telemetry: str
    txn: str
    status: str
    deadletter: str
    health: str
    terminal_state: str
    cashflow: str
    alerts: str
    integrity: str


def topic_names(kafka: KafkaSettings) -> TopicNames:
    """The topic names for ``kafka.topic_prefix``."""
    p = kafka.topic_prefix
    return TopicNames(
        telemetry=f"{p}.telemetry.v1",
        txn=f"{p}.txn.v1",
        status=f"{p}.status.v1",
        deadletter=f"{p}.deadletter.v1",
        health=f"{p}.health.v1",
        terminal_state=f"{p}.terminal-state.v1",
        cashflow=f"{p}.cashflow.v1",
        alerts=f"{p}.alerts.v1",
        integrity=f"{p}.integrity.v1",
    )


def pipeline_topics(kafka: KafkaSettings) -> list[TopicSpec]:
    """Every topic posflow's services read or write, for one settings object."""
    names = topic_names(kafka)
    n = kafka.default_partitions
    keep = {"cleanup.policy": "delete", "min.insync.replicas": "1"}
    compact = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
    return [
        TopicSpec(
            names.telemetry,
            n,
            {**keep, "retention.ms": str(7 * _DAY_MS)},
            "terminal telemetry envelopes, keyed by terminal id",
        ),
        TopicSpec(
            names.txn,
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "payment outcomes, keyed by merchant id",
        ),
        TopicSpec(
            names.status,
            n,
            compact,
            "online/offline status, latest per terminal (compacted)",
        ),
        TopicSpec(
            names.deadletter,
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "rejected input with reason code and redacted payload",
        ),
        TopicSpec(
            names.health,
            n,
            {**keep, "retention.ms": str(7 * _DAY_MS)},
            "per-terminal health records, keyed by terminal id",
        ),
        TopicSpec(
            names.terminal_state,
            n,
            compact,
            "current state per terminal (compacted)",
        ),
        TopicSpec(
            names.cashflow,
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "merchant cash-flow events, keyed by merchant id",
        ),
        TopicSpec(
            names.alerts,
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "alert lifecycle events, keyed by alert fingerprint",
        ),
        TopicSpec(
            names.integrity,
            n,
            {**keep, "retention.ms": str(30 * _DAY_MS)},
            "integrity events (e.g. a transaction id reused with another body), keyed by merchant",
        ),
    ]
