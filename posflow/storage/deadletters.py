"""Dead letters counted per minute and reason, each Kafka record exactly once.

The Pipeline dashboard's "Dead letters by reason (stored counts)" reads
``deadletter_counts``; the raw sink feeds it from the dead-letter topic. Offsets
live with the counts (``deadletter_offsets``, one row per partition, locked while a
batch is counted), so a batch read again after a crash or a rebalance is skipped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg

from posflow.contracts import ContractError, DeadLetter

__all__ = ["DeadLetterRecord", "count_dead_letters"]


class DeadLetterRecord(Protocol):
    """What the count needs of a Kafka record (aiokafka's ConsumerRecord has it)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    value: bytes | None


def _reason_and_minute(record: DeadLetterRecord) -> tuple[datetime, str]:
    try:
        letter = DeadLetter.from_json(record.value or b"")
        at, reason = letter.received_at, letter.reason.value
    except (ContractError, ValueError):
        # Not a dead letter of ours (another producer): counted, under its Kafka time.
        at, reason = datetime.fromtimestamp(record.timestamp / 1000, UTC), "unreadable"
    return at.replace(second=0, microsecond=0), reason


def count_dead_letters(
    conn: psycopg.Connection[tuple[Any, ...]], records: Sequence[DeadLetterRecord]
) -> int:
    """Add ``records`` to ``deadletter_counts`` unless counted before; returns how many
    were new. One transaction; safe to call again with the same records."""
    if not records:
        return 0
    with conn.transaction():
        partitions = sorted({(r.topic, r.partition) for r in records})
        conn.cursor().executemany(
            "INSERT INTO deadletter_offsets (kafka_topic, kafka_partition, next_offset)"
            " VALUES (%s, %s, 0) ON CONFLICT DO NOTHING",
            partitions,
        )
        stored: dict[tuple[str, int], int] = {}
        for topic, partition in partitions:  # locked in a fixed order: no deadlock
            row = conn.execute(
                "SELECT next_offset FROM deadletter_offsets"
                " WHERE kafka_topic = %s AND kafka_partition = %s FOR UPDATE",
                [topic, partition],
            ).fetchone()
            stored[(topic, partition)] = int(row[0]) if row else 0
        fresh = [r for r in records if r.offset >= stored[(r.topic, r.partition)]]
        counts = Counter(_reason_and_minute(r) for r in fresh)
        conn.cursor().executemany(
            "INSERT INTO deadletter_counts (bucket, reason, count) VALUES (%s, %s, %s)"
            " ON CONFLICT (bucket, reason) DO UPDATE"
            " SET count = deadletter_counts.count + excluded.count",
            [(bucket, reason, n) for (bucket, reason), n in sorted(counts.items())],
        )
        nxt: dict[tuple[str, int], int] = {}
        for r in fresh:
            key = (r.topic, r.partition)
            nxt[key] = max(nxt.get(key, 0), r.offset + 1)
        conn.cursor().executemany(
            "UPDATE deadletter_offsets SET next_offset = %s"
            " WHERE kafka_topic = %s AND kafka_partition = %s",
            [(n, t, p) for (t, p), n in sorted(nxt.items())],
        )
    return len(fresh)
